//! LoRA and DoRA on a frozen linear layer, computed as PEFT's `lora.Linear` does:
//! `y = base(x) + s * B(A(dropout(x)))`, with the adapter path in f32 whatever the base dtype,
//! added to the base output in f32 and cast back (PEFT's `result.to(torch_result_dtype)`).
//! Burn's own LoRA (which rebuilds W + sBA every forward and cannot mix dtypes) is not used.

pub mod target;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::linear;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::config::{InitLoraWeights, LoraConfig};
use crate::ops::{
    base_linear, lora_add, lora_linear, lora_linear_seed, seed_gradient, LoraParts, ModelBackend,
    RowsAdapter, TrainBackend,
};
use crate::quant::Nf4Linear;

pub use target::{Targets, ALL_LINEAR};

/// PEFT's tensor names in `adapter_model.safetensors`, under `peft_key`.
pub const LORA_A: &str = "lora_A.weight";
pub const LORA_B: &str = "lora_B.weight";
pub const MAGNITUDE: &str = "lora_magnitude_vector";

/// The key of one tensor (`part`: `LORA_A`, `LORA_B`, `MAGNITUDE`) of the adapter on `module`
/// (a full module name, `model.layers.0.self_attn.q_proj`) in PEFT's files.
pub fn peft_key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}")
}

/// The trainable part of one adapted layer. Stored in Burn's `[in, out]` orientation; PEFT's
/// files hold the transposes (`lora_A.weight` [r, in], `lora_B.weight` [out, r]).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>, // [in, r], f32
    pub lora_b: Param<Tensor<B, 2>>, // [r, out], f32
    /// DoRA's learned magnitude of every output row of W + sBA.
    pub lora_magnitude_vector: Option<Param<Tensor<B, 1>>>, // [out], f32
    pub dropout: Dropout,
    pub scaling: f64,
}

/// The frozen layer under an adapter: dense, or NF4 for QLoRA.
#[derive(Module, Debug)]
pub enum BaseLinear<B: Backend> {
    Dense(Linear<B>), // [in, out] in the compute dtype
    Nf4(Nf4Linear<B>),
}

impl<B: ModelBackend> BaseLinear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Dense(l) => base_linear(x, l.weight.val(), l.bias.as_ref().map(|b| b.val())),
            Self::Nf4(l) => l.forward(x),
        }
    }
}

impl<B: Backend> BaseLinear<B> {
    /// The weight in Burn's `[in, out]` orientation, f32 (dequantized for NF4).
    pub fn weight_f32(&self) -> Tensor<B, 2> {
        match self {
            Self::Dense(l) => l.weight.val().cast(DType::F32),
            Self::Nf4(l) => l.dequantize(DType::F32).transpose(),
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Dense(l) => l.weight.dims(),
            Self::Nf4(l) => [l.n_in, l.n_out],
        }
    }

    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        match self {
            Self::Dense(l) => l.bias.as_ref().map(|b| b.val()),
            Self::Nf4(l) => l.bias.as_ref().map(|b| b.val()),
        }
    }
}

/// A linear layer that may carry an adapter. Built so by the model builder, per module name.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    pub base: BaseLinear<B>,
    pub adapter: Option<Lora<B>>,
    /// A server's named adapters on this layer, by their index in the server's list; None where
    /// that adapter does not target this layer. Empty outside `deploy`.
    pub served: Vec<Option<Lora<B>>>,
}

/// Which adapter each row of a batch takes, when a server runs rows of several adapters in one
/// batch. A row's adapter is `None` for the layer's own (`LoraLinear::adapter`), or `Some(k)` for
/// the server's adapter `k` (`LoraLinear::served`), which replaces the own one for that row as
/// PEFT's `set_adapter` does.
#[derive(Debug, Clone)]
pub enum RowAdapters<B: Backend> {
    /// Every row takes this one.
    Same(Option<usize>),
    /// The rows of each adapter (ascending, and as a `[n]` tensor), and the order that puts the
    /// groups' rows, concatenated, back in the batch's order.
    Grouped {
        groups: Vec<(Option<usize>, Vec<usize>, Tensor<B, 1, Int>)>,
        restore: Tensor<B, 1, Int>,
    },
}

impl<B: Backend> RowAdapters<B> {
    /// `rows[i]` is row i's adapter.
    pub fn new(rows: &[Option<usize>], device: &B::Device) -> Self {
        let mut kinds: Vec<Option<usize>> = rows.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        if kinds.len() <= 1 {
            return Self::Same(kinds.first().copied().flatten());
        }
        let index = |ids: Vec<i64>| {
            let n = ids.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device)
        };
        let mut order: Vec<usize> = Vec::with_capacity(rows.len());
        let groups = kinds
            .into_iter()
            .map(|kind| {
                let members: Vec<usize> = (0..rows.len()).filter(|&r| rows[r] == kind).collect();
                order.extend(&members);
                let tensor = index(members.iter().map(|&r| r as i64).collect());
                (kind, members, tensor)
            })
            .collect();
        // Row r of the batch is at position restore[r] of the concatenated groups.
        let mut restore = vec![0i64; rows.len()];
        for (at, &r) in order.iter().enumerate() {
            restore[r] = at as i64;
        }
        Self::Grouped {
            groups,
            restore: index(restore),
        }
    }
}

impl<B: ModelBackend> LoraLinear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_with(self.adapter.as_ref(), x)
    }

    /// `forward` with each row of `x` (`[batch, ..]`) through its own adapter. On a dense base
    /// with plain adapters the base product is computed once for every row and each adapter added
    /// to its rows as `forward` adds it (`ops::lora_add`), so that a row's output is what a batch
    /// of its adapter alone gives. Otherwise (NF4, DoRA) each group of rows runs the whole layer.
    pub fn forward_rows<const D: usize>(
        &self,
        x: Tensor<B, D>,
        rows: Option<&RowAdapters<B>>,
    ) -> Tensor<B, D> {
        let Some(RowAdapters::Grouped { groups, restore }) = rows else {
            let adapter = match rows {
                Some(RowAdapters::Same(k)) => self.route(*k),
                _ => self.adapter.as_ref(),
            };
            return self.forward_with(adapter, x);
        };
        let fused = groups
            .iter()
            .all(|(k, ..)| self.route(*k).is_none_or(|l| self.fused(l, &x).is_some()));
        // `fused` is true only on a dense base, whose product `lora_add` reuses.
        if fused && matches!(self.base, BaseLinear::Dense(_)) {
            let adapters = groups
                .iter()
                .filter_map(|(k, rows, _)| {
                    let l = self.route(*k)?;
                    let (a, b) = (l.lora_a.val(), l.lora_b.val());
                    Some(RowsAdapter::new(rows.clone(), a, b, l.scaling))
                })
                .collect();
            return lora_add(self.base.forward(x.clone()), x, adapters);
        }
        let parts = groups
            .iter()
            .map(|(k, _, rows)| {
                self.forward_with(self.route(*k), x.clone().select(0, rows.clone()))
            })
            .collect();
        Tensor::cat(parts, 0).select(0, restore.clone())
    }

    fn route(&self, adapter: Option<usize>) -> Option<&Lora<B>> {
        match adapter {
            None => self.adapter.as_ref(),
            Some(k) => self.served.get(k).and_then(Option::as_ref),
        }
    }

    fn forward_with<const D: usize>(
        &self,
        adapter: Option<&Lora<B>>,
        x: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let Some(l) = adapter else {
            return self.base.forward(x);
        };
        if let Some(layer) = self.fused(l, &x) {
            return lora_linear(x, layer);
        }
        let base = self.base.forward(x.clone());
        let dtype = base.dtype();
        let base = base.cast(DType::F32);
        let x = l.dropout.forward(x.cast(DType::F32));
        // As `ops::lora_linear`, scaling A's output.
        let update = linear(
            linear(x.clone(), l.lora_a.val(), None) * l.scaling,
            l.lora_b.val(),
            None,
        );
        let out = match &l.lora_magnitude_vector {
            None => base + update,
            Some(m) => {
                // DoRA (PEFT's DoraLinearLayer): scale each output by m / ||W + sBA||, the norm
                // detached. `(scale - 1) * base` turns the base output into the rescaled one.
                let w = self.base.weight_f32(); // [in, out]
                let scale = (m.val() / l.weight_norm(w.clone()).detach()).unsqueeze::<D>(); // [.., out]
                let base_no_bias = if l.dropout.prob > 0.0 && B::ad_enabled(&x.device()) {
                    // With dropout the base term is recomputed on the dropped-out input, as PEFT does.
                    linear(x, w, None)
                } else {
                    match self.base.bias() {
                        Some(b) => base.clone() - b.cast(DType::F32).unsqueeze::<D>(),
                        None => base.clone(),
                    }
                };
                base + base_no_bias * (scale.clone() - 1.0) + update * scale
            }
        };
        out.cast(dtype)
    }

    /// The layer as one `lora_linear` op, where it is one: a dense base with a plain adapter
    /// (no DoRA, no dropout while training).
    fn fused<const D: usize>(&self, l: &Lora<B>, x: &Tensor<B, D>) -> Option<LoraParts<B>> {
        let dropout = l.dropout.prob > 0.0 && B::ad_enabled(&x.device());
        match (&self.base, &l.lora_magnitude_vector, dropout) {
            (BaseLinear::Dense(base), None, false) => Some(LoraParts::new(
                base.weight.val(),
                base.bias.as_ref().map(|b| b.val()),
                l.lora_a.val(),
                l.lora_b.val(),
                l.scaling,
            )),
            _ => None,
        }
    }
}

impl<B: TrainBackend> LoraLinear<B> {
    /// A seed (`ops::seed_gradient`) whose backward pass is this layer's on `x` from the
    /// gradient `grad` of its output; a fused layer does not compute that output.
    pub fn seed<const D: usize>(&self, x: Tensor<B, D>, grad: Tensor<B, D>) -> Tensor<B, 1> {
        match self.adapter.as_ref().and_then(|l| self.fused(l, &x)) {
            Some(layer) => lora_linear_seed(x, layer, grad),
            None => seed_gradient(self.forward(x), grad),
        }
    }
}

impl<B: Backend> Lora<B> {
    /// The trainable tensors, flattened, each with the suffix of its PEFT key. The optimizer
    /// works on these; their order is the one `set_trainable` takes back.
    pub fn trainable(&self) -> Vec<(&'static str, Tensor<B, 1>)> {
        let mut out = vec![
            (LORA_A, self.lora_a.val().flatten(0, 1)),
            (LORA_B, self.lora_b.val().flatten(0, 1)),
        ];
        if let Some(m) = &self.lora_magnitude_vector {
            out.push((MAGNITUDE, m.val()));
        }
        out
    }

    /// How many tensors `trainable` gives.
    pub fn trainable_count(&self) -> usize {
        2 + usize::from(self.lora_magnitude_vector.is_some())
    }

    /// Replaces the trainable tensors by `values` (flattened, in `trainable`'s order), keeping
    /// each parameter's id and shape. Under autodiff the new values are leaves that require grad.
    pub fn set_trainable(&mut self, values: Vec<Tensor<B, 1>>) {
        assert_eq!(values.len(), self.trainable_count(), "one value per tensor");
        let mut values = values.into_iter();
        let mut next = || values.next().expect("counted");
        replace(&mut self.lora_a, next());
        replace(&mut self.lora_b, next());
        if let Some(m) = &mut self.lora_magnitude_vector {
            replace(m, next());
        }
    }

    /// `s * (A @ B)` in the `[in, out]` orientation of the base weight, f32.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scaling
    }

    /// `||W + sBA||` of every output row (PEFT's `get_weight_norm`), `[out]`. `w` is `[in, out]`.
    pub fn weight_norm(&self, w: Tensor<B, 2>) -> Tensor<B, 1> {
        output_norms(w + self.delta_weight()).squeeze_dim(0)
    }

    /// The weight this adapted layer computes with, `[in, out]` f32 from `w` `[in, out]` f32:
    /// `W + sBA`, and for DoRA rescaled to the learned magnitude of every output row
    /// (`m / ||W + sBA|| * (W + sBA)`, PEFT's merge).
    pub fn merged_weight(&self, w: Tensor<B, 2>) -> Tensor<B, 2> {
        let merged = w + self.delta_weight(); // [in, out]
        match &self.lora_magnitude_vector {
            None => merged,
            Some(m) => {
                let norm = output_norms(merged.clone()); // [1, out]
                merged * (m.val().unsqueeze_dim::<2>(0) / norm)
            }
        }
    }

    /// A fresh adapter on a layer of `[n_in, n_out]` as PEFT initialises one (DoRA's magnitude
    /// comes from the base weight: `with_magnitude`).
    /// The values come from a generator seeded by `seed` and the module name, so they do not
    /// depend on the order layers are built in.
    pub fn init(
        cfg: &LoraConfig,
        name: &str,
        [n_in, n_out]: [usize; 2],
        seed: u64,
        device: &B::Device,
    ) -> Result<Self, String> {
        let r = cfg.r;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name));
        let uniform = |rng: &mut rand::rngs::StdRng, n: usize, bound: f32| -> Vec<f32> {
            let d = Uniform::new_inclusive(-bound, bound).expect("finite bound");
            (0..n).map(|_| d.sample(rng)).collect()
        };
        // kaiming_uniform_(a=sqrt(5)) on a [fan_out, fan_in] matrix is U(-1/sqrt(fan_in), +).
        let kaiming = |rng: &mut rand::rngs::StdRng, n: usize, fan_in: usize| {
            uniform(rng, n, 1.0 / (fan_in as f32).sqrt())
        };
        let (a, b) = match &cfg.init_lora_weights {
            InitLoraWeights::Flag(true) => {
                (kaiming(&mut rng, n_in * r, n_in), vec![0.0; r * n_out])
            }
            // PEFT leaves both at nn.Linear's default init: B is not zero, the adapter starts active.
            InitLoraWeights::Flag(false) => (
                kaiming(&mut rng, n_in * r, n_in),
                kaiming(&mut rng, r * n_out, r),
            ),
            InitLoraWeights::Method(m) if m == "gaussian" => {
                let d = Normal::new(0.0f32, 1.0 / r as f32).expect("positive std");
                (
                    (0..n_in * r).map(|_| d.sample(&mut rng)).collect(),
                    vec![0.0; r * n_out],
                )
            }
            InitLoraWeights::Method(m) => {
                return Err(format!(
                    "init_lora_weights \"{m}\" is not supported (true, false, \"gaussian\")"
                ))
            }
        };
        let f32_tensor = |v: Vec<f32>, shape: [usize; 2]| {
            Tensor::<B, 2>::from_data(TensorData::new(v, shape), (device, DType::F32))
        };
        Ok(Self {
            lora_a: Param::from_tensor(f32_tensor(a, [n_in, r])),
            lora_b: Param::from_tensor(f32_tensor(b, [r, n_out])),
            lora_magnitude_vector: None,
            dropout: DropoutConfig::new(cfg.lora_dropout).init(),
            scaling: cfg.scaling(),
        })
    }

    /// DoRA's fresh magnitude: `||W + sBA||` of every output row of `base_weight` ([in, out]).
    pub fn with_magnitude(mut self, base_weight: &Tensor<B, 2>) -> Self {
        // Detached: A is a tracked leaf by now (`Param::from_tensor`), and a parameter made
        // from a tensor computed from it would not be a leaf (Burn's autodiff refuses it).
        let norm = self
            .weight_norm(base_weight.clone().cast(DType::F32))
            .detach();
        self.lora_magnitude_vector = Some(Param::from_tensor(norm));
        self
    }

    /// An adapter from loaded tensors (`lora_a` [in, r], `lora_b` [r, out], f32).
    pub fn from_weights(
        cfg: &LoraConfig,
        lora_a: Tensor<B, 2>,
        lora_b: Tensor<B, 2>,
        magnitude: Option<Tensor<B, 1>>,
    ) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            lora_magnitude_vector: magnitude.map(Param::from_tensor),
            dropout: DropoutConfig::new(cfg.lora_dropout).init(),
            scaling: cfg.scaling(),
        }
    }
}

impl<B: AutodiffBackend> Lora<B> {
    /// The gradients of the trainable tensors, flattened in `trainable`'s order (None where the
    /// backward pass did not reach a tensor).
    pub fn trainable_grads(&self, grads: &B::Gradients) -> Vec<Option<Tensor<B::InnerBackend, 1>>> {
        let mut out = vec![
            self.lora_a.val().grad(grads).map(|g| g.flatten(0, 1)),
            self.lora_b.val().grad(grads).map(|g| g.flatten(0, 1)),
        ];
        if let Some(m) = &self.lora_magnitude_vector {
            out.push(m.val().grad(grads));
        }
        out
    }
}

/// The norm of every column (output row of the layer) of `w` `[in, out]`, `[1, out]`.
fn output_norms<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 2> {
    w.powi_scalar(2).sum_dim(0).sqrt()
}

fn replace<B: Backend, const D: usize>(param: &mut Param<Tensor<B, D>>, flat: Tensor<B, 1>) {
    let value = flat.reshape(param.val().shape()).detach().require_grad();
    *param = Param::initialized(param.id, value);
}

/// 64-bit FNV-1a: a hash that stays the same across Rust versions and platforms.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
