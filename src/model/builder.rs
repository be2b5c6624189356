//! Builds each linear layer of the model from the checkpoint and decides, by its full module name,
//! whether it carries a LoRA adapter (DESIGN: LoRA is built in when the model is built).

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::frozen;
use super::load::Checkpoint;
use super::moe::{ExpertLinears, ExpertWeights, EXPERT_LINEARS};
use crate::config::{LoraConfig, Nf4Config};
use crate::lora::{peft_key, BaseLinear, Lora, LoraLinear, Targets, LORA_A, LORA_B, MAGNITUDE};
use crate::quant::Nf4Linear;

/// Where adapter weights come from.
pub enum AdapterSource {
    /// Initialised as PEFT does, seeded.
    Init { seed: u64 },
    /// Read from a PEFT `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`).
    Weights(Checkpoint),
}

/// An adapter to build into the model.
pub struct LoraPlan {
    pub config: LoraConfig,
    pub source: AdapterSource,
}

pub(crate) struct Builder<'a, B: Backend> {
    pub ckpt: &'a mut Checkpoint,
    pub device: &'a B::Device,
    lora: Option<(&'a LoraConfig, Targets, &'a mut AdapterSource)>,
    /// QLoRA: decoder-layer linear weights held in NF4.
    quant: Option<Nf4Config>,
    /// Names of the adapted modules, in build order.
    pub adapted: Vec<String>,
    /// Problems met building adapters (reported with the checkpoint's).
    pub problems: Vec<String>,
}

impl<'a, B: Backend> Builder<'a, B> {
    pub fn new(
        ckpt: &'a mut Checkpoint,
        lora: Option<&'a mut LoraPlan>,
        quant: Option<Nf4Config>,
        device: &'a B::Device,
    ) -> Result<Self, String> {
        let lora = match lora {
            None => None,
            Some(plan) => {
                plan.config.check()?;
                let targets = Targets::of(&plan.config)?;
                if targets.matches("lm_head") {
                    return Err(
                        "target_modules matches lm_head, which swift-rs does not adapt".into(),
                    );
                }
                Some((&plan.config, targets, &mut plan.source))
            }
        };
        Ok(Self {
            ckpt,
            device,
            lora,
            quant,
            adapted: Vec::new(),
            problems: Vec::new(),
        })
    }

    /// Hugging Face stores a linear weight `[out, in]`; Burn's `Linear` keeps `[in, out]`
    /// (`Checkpoint::take_linear` translates, the one place that happens on load).
    pub fn plain_linear(&mut self, name: &str, n_in: usize, n_out: usize, bias: bool) -> Linear<B> {
        Linear {
            weight: frozen(self.ckpt.take_linear(
                &format!("{name}.weight"),
                [n_out, n_in],
                self.device,
            )),
            bias: bias.then(|| {
                frozen(
                    self.ckpt
                        .take(&format!("{name}.bias"), [n_out], self.device),
                )
            }),
        }
    }

    /// The frozen part of a decoder-layer linear: dense, or quantized to NF4 from the weight in
    /// the compute dtype (as bitsandbytes quantizes what transformers loaded).
    fn base_linear(&mut self, name: &str, n_in: usize, n_out: usize, bias: bool) -> BaseLinear<B> {
        let Some(config) = self.quant else {
            return BaseLinear::Dense(self.plain_linear(name, n_in, n_out, bias));
        };
        let key = format!("{name}.weight");
        let data = self.ckpt.take_data(&key, &[n_out, n_in]);
        let bias = bias.then(|| {
            frozen(
                self.ckpt
                    .take(&format!("{name}.bias"), [n_out], self.device),
            )
        });
        match data.map(|d| d.convert_dtype(DType::F32).into_vec::<f32>()) {
            Some(Ok(w)) => BaseLinear::Nf4(Nf4Linear::quantize(
                &w,
                [n_out, n_in],
                bias,
                config,
                self.device,
            )),
            // The problem is recorded; the model will not be used.
            _ => BaseLinear::Dense(Linear {
                weight: frozen(Tensor::zeros([1, 1], self.device)),
                bias,
            }),
        }
    }

    /// A mixture of experts' stacked weights (see `Checkpoint::take_experts_data`): dense in
    /// Burn's `[experts, in, out]`, or, for QLoRA, each expert's `[out, in]` quantized to NF4 as
    /// bitsandbytes quantizes a linear of that shape.
    pub fn experts(
        &mut self,
        prefix: &str,
        fused: &str,
        parts: &[&str],
        dims: [usize; 3],
    ) -> ExpertWeights<B> {
        let Some(config) = self.quant else {
            let stacked = self
                .ckpt
                .take_experts(prefix, fused, parts, dims, self.device);
            return ExpertWeights::Dense(frozen(stacked));
        };
        let [_, part_out, n_in] = dims;
        let n_out = parts.len() * part_out;
        let data = self.ckpt.take_experts_data(prefix, fused, parts, dims);
        match data.map(|d| d.convert_dtype(DType::F32).into_vec::<f32>()) {
            Some(Ok(w)) => ExpertWeights::Nf4(
                w.chunks_exact(n_out * n_in)
                    .map(|w| Nf4Linear::quantize(w, [n_out, n_in], None, config, self.device))
                    .collect(),
            ),
            // The problem is recorded; the model will not be used.
            _ => ExpertWeights::Dense(frozen(Tensor::zeros([1, 1, 1], self.device))),
        }
    }

    /// The linear layer `name`, with an adapter when the plan targets it.
    pub fn linear(&mut self, name: &str, n_in: usize, n_out: usize, bias: bool) -> LoraLinear<B> {
        let base = self.base_linear(name, n_in, n_out, bias);
        let targeted = self.lora.as_ref().is_some_and(|(_, t, _)| t.matches(name));
        // A fresh DoRA adapter's magnitude comes from the base weight.
        let fresh_dora =
            matches!(&self.lora, Some((c, _, AdapterSource::Init { .. })) if c.use_dora);
        let adapter = targeted
            .then(|| self.adapter(name, name, [n_in, n_out], 1))
            .flatten()
            .map(|l| match fresh_dora {
                true => l.with_magnitude(&base.weight_f32()),
                false => l,
            });
        LoraLinear {
            base,
            adapter,
            served: Vec::new(),
        }
    }

    /// The router `name` (`mlp.gate`), dense even for QLoRA (transformers 5's router is no
    /// linear module, so bitsandbytes leaves it alone). Adapted only when `target_modules` names
    /// it itself, as PEFT did on transformers 4.x where it was a linear, or `target_parameters`
    /// names its weight (PEFT 0.21); `all-linear` leaves it out, as ms-swift's does.
    pub fn router(&mut self, name: &str, n_in: usize, n_out: usize) -> LoraLinear<B> {
        let base = BaseLinear::Dense(self.plain_linear(name, n_in, n_out, false));
        let parameter = format!("{name}.weight");
        let targeted = self.routed_module(name)
            || self
                .lora
                .as_ref()
                .is_some_and(|(_, t, _)| t.matches_parameter(&parameter));
        let adapter = targeted
            .then(|| self.routed_adapter(name, [n_in, n_out]))
            .flatten();
        LoraLinear {
            base,
            adapter,
            served: Vec::new(),
        }
    }

    /// The adapters of transformers 4.x's per-expert linears under `experts` (`experts.N.gate_proj`
    /// `[hidden, inter]`, `up_proj`, `down_proj` `[inter, hidden]`), on a family that had them
    /// (`v4`), where `routed_module` says so; empty when none is adapted.
    pub fn per_expert_adapters(
        &mut self,
        experts: &str,
        n_experts: usize,
        [h, inter]: [usize; 2],
        v4: bool,
    ) -> Vec<ExpertLinears<B>> {
        if !v4 {
            return Vec::new();
        }
        let dims = [[h, inter], [h, inter], [inter, h]];
        let linears: Vec<ExpertLinears<B>> = (0..n_experts)
            .map(|e| {
                let [gate_proj, up_proj, down_proj] = std::array::from_fn(|k| {
                    let name = format!("{experts}.{e}.{}", EXPERT_LINEARS[k]);
                    let targeted = self.routed_module(&name);
                    targeted
                        .then(|| self.routed_adapter(&name, dims[k]))
                        .flatten()
                });
                ExpertLinears {
                    gate_proj,
                    up_proj,
                    down_proj,
                }
            })
            .collect();
        let none = |l: &ExpertLinears<B>| {
            l.gate_proj.is_none() && l.up_proj.is_none() && l.down_proj.is_none()
        };
        match linears.iter().all(none) {
            true => Vec::new(),
            false => linears,
        }
    }

    /// Whether the routed module `name` (the router, a transformers 4.x per-expert linear) takes
    /// an adapter as a module (`adapts_routed_module`).
    fn routed_module(&self, name: &str) -> bool {
        self.lora.as_ref().is_some_and(|(_, t, source)| {
            let weights = match source {
                AdapterSource::Init { .. } => None,
                AdapterSource::Weights(w) => Some(w),
            };
            adapts_routed_module(t, weights, name)
        })
    }

    /// A routed module's adapter; DoRA is refused there, as PEFT 0.21 refuses it on the
    /// parameters it turns these modules into.
    fn routed_adapter(&mut self, name: &str, dims: [usize; 2]) -> Option<Lora<B>> {
        if self.lora.as_ref().is_some_and(|(c, ..)| c.use_dora) {
            self.problems.push(format!(
                "{name}: DoRA is not supported on the router or the routed experts (PEFT 0.21 \
                 refuses it there too); adapt them with LoRA or rsLoRA, or leave them out of \
                 target_modules"
            ));
            return None;
        }
        self.adapter(name, name, dims, 1)
    }

    /// PEFT's adapter on the stacked experts' parameter `param` (`[experts, ..]`, each expert
    /// `[n_in, n_out]`) when `target_parameters` names it. `name` is the module PEFT's keys name
    /// (see `SparseMoeBlock::load`).
    pub fn expert_adapter(
        &mut self,
        name: &str,
        param: &str,
        dims: [usize; 2],
        experts: usize,
    ) -> Option<Lora<B>> {
        let targeted = self.targets_parameter(param);
        targeted.then(|| self.adapter(name, param, dims, experts))?
    }

    /// Whether `target_parameters` names the parameter `param` (a full name).
    pub fn targets_parameter(&self, param: &str) -> bool {
        self.lora
            .as_ref()
            .is_some_and(|(_, t, _)| t.matches_parameter(param))
    }

    /// The adapter PEFT's files name `name` on a layer of `[n_in, n_out]`, with the `r` and
    /// `lora_alpha` of `target` (`LoraConfig::for_target`): `stacked` experts' adapters side by
    /// side in the rank, as PEFT's `ParamWrapper` holds them (`lora_A.weight` [r * experts, in],
    /// expert-major; `lora_B.weight` [out, r * experts], rank-major), scaled by `alpha / r`.
    fn adapter(
        &mut self,
        name: &str,
        target: &str,
        [n_in, n_out]: [usize; 2],
        stacked: usize,
    ) -> Option<Lora<B>> {
        let (cfg, _, source) = self.lora.as_mut()?;
        self.adapted.push(target.to_string());
        let cfg = cfg.for_target(target);
        let scaling = cfg.scaling();
        let cfg = LoraConfig {
            r: cfg.r * stacked,
            ..cfg
        };
        let lora = match source {
            AdapterSource::Init { seed } => {
                Lora::init(&cfg, target, [n_in, n_out], *seed, self.device)
            }
            AdapterSource::Weights(w) => {
                Ok(read_lora_tensors(w, &cfg, name, [n_in, n_out], self.device))
            }
        };
        match lora {
            Ok(l) => Some(Lora { scaling, ..l }),
            Err(e) => {
                self.problems.push(e);
                None
            }
        }
    }

    /// Ends building: the adapter checkpoint's own problems, and an error when the plan matched
    /// nothing.
    pub fn finish(self) -> Result<(), Vec<String>> {
        let mut problems = self.problems;
        if let Some((cfg, _, source)) = self.lora {
            if self.adapted.is_empty() {
                problems.push(cfg.matches_nothing());
            }
            if let AdapterSource::Weights(w) = source {
                problems.extend(w.problems().iter().map(ToString::to_string));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Whether the routed module `name` (the router `mlp.gate`, or a transformers 4.x per-expert
/// linear `mlp.experts.N.gate_proj`) takes an adapter as a module: `target_modules` names it
/// itself (all-linear does not, as ms-swift's does not) and, read from an adapter checkpoint
/// (`weights`), the checkpoint holds it: PEFT 0.21's files list the dense layers' `gate_proj`
/// in target_modules and hold the experts' adapters fused. The model and merge both ask here.
pub fn adapts_routed_module(targets: &Targets, weights: Option<&Checkpoint>, name: &str) -> bool {
    targets.names(name) && weights.is_none_or(|w| w.contains(&peft_key(name, LORA_A)))
}

/// The adapter on module `name` (`[n_in, n_out]`) from a PEFT adapter checkpoint; problems
/// (missing or mis-shaped tensors) are recorded in `ckpt`.
pub fn read_lora<B: Backend>(
    ckpt: &mut Checkpoint,
    cfg: &LoraConfig,
    name: &str,
    [n_in, n_out]: [usize; 2],
    device: &B::Device,
) -> Lora<B> {
    read_lora_tensors(ckpt, &cfg.for_target(name), name, [n_in, n_out], device)
}

/// `read_lora` with `cfg`'s own `r`, for a module whose patterns are resolved already.
fn read_lora_tensors<B: Backend>(
    ckpt: &mut Checkpoint,
    cfg: &LoraConfig,
    name: &str,
    [n_in, n_out]: [usize; 2],
    device: &B::Device,
) -> Lora<B> {
    let key = |part: &str| peft_key(name, part);
    let a = ckpt.take_linear(&key(LORA_A), [cfg.r, n_in], device);
    let b = ckpt.take_linear(&key(LORA_B), [n_out, cfg.r], device);
    let m = cfg
        .use_dora
        .then(|| ckpt.take(&key(MAGNITUDE), [n_out], device));
    Lora::from_weights(cfg, a, b, m)
}
