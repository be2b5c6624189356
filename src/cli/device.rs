//! `--device auto|cpu|cuda[:N]|wgpu[:N]`: which backend runs the command. Everything below the
//! CLI is generic over the backend; this is where one is picked.

use anyhow::anyhow;
use swift_rs::config::Device;

use super::Failure;

/// Calls the generic body with the backend and device of `resolved` (a `Resolved`).
/// `$body` is a generic function `fn<B: Backend>(device: B::Device, ...) -> Result<T, Failure>`.
macro_rules! with_backend {
    ($resolved:expr, $body:ident ( $($extra:expr),* )) => {{
        match $resolved {
            $crate::cli::device::Resolved::Cpu => {
                $body::<burn::backend::Flex>(Default::default() $(, $extra)*)
            }
            #[cfg(feature = "cuda")]
            $crate::cli::device::Resolved::Cuda(n) => {
                $body::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(n) $(, $extra)*)
            }
            #[cfg(feature = "wgpu")]
            $crate::cli::device::Resolved::Wgpu(_, device) => {
                $body::<burn::backend::Wgpu>(device $(, $extra)*)
            }
        }
    }};
}
pub(crate) use with_backend;

pub enum Resolved {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(usize),
    /// The adapter's place in wgpu's list, and Burn's name for it.
    #[cfg(feature = "wgpu")]
    Wgpu(usize, burn::backend::wgpu::WgpuDevice),
}

impl Resolved {
    /// The device as the training config names it.
    pub fn device(&self) -> Device {
        match self {
            Self::Cpu => Device::Cpu,
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => Device::Cuda(*n),
            #[cfg(feature = "wgpu")]
            Self::Wgpu(n, _) => Device::Wgpu(*n),
        }
    }
}

/// The backend for `arg`: `auto` takes CUDA, then a wgpu GPU (not a software one), among those
/// built in and present, else the CPU.
pub fn resolve(arg: Device) -> Result<Resolved, Failure> {
    match arg {
        Device::Cpu => Ok(Resolved::Cpu),
        Device::Auto => Ok(auto()),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => cuda_device(n)
            .map(|()| Resolved::Cuda(n))
            .map_err(|e| Failure::Runtime(anyhow!("--device cuda:{n}: {e}"))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Failure::Usage(anyhow!(
            "--device cuda: this binary was built without CUDA (rebuild with `--features cuda`)"
        ))),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(n) => wgpu_device(n),
        #[cfg(not(feature = "wgpu"))]
        Device::Wgpu(_) => Err(Failure::Usage(anyhow!(
            "--device wgpu: this binary was built without wgpu (rebuild with `--features wgpu`)"
        ))),
    }
}

fn auto() -> Resolved {
    #[cfg(feature = "cuda")]
    if cuda_device(0).is_ok() {
        return Resolved::Cuda(0);
    }
    #[cfg(feature = "wgpu")]
    {
        let adapters = swift_rs::ops::wgpu_adapters();
        if let Some((n, a)) = adapters
            .into_iter()
            .enumerate()
            .find(|(_, a)| !a.is_software())
        {
            return Resolved::Wgpu(n, a.device);
        }
    }
    Resolved::Cpu
}

/// The N-th wgpu adapter, or an error listing those there are.
#[cfg(feature = "wgpu")]
fn wgpu_device(n: usize) -> Result<Resolved, Failure> {
    let adapters = swift_rs::ops::wgpu_adapters();
    match adapters.get(n) {
        Some(a) => {
            let info = &a.info;
            swift_rs::say!(
                "wgpu:{n}: {} ({:?}, {})",
                info.name,
                info.backend,
                info.driver
            );
            Ok(Resolved::Wgpu(n, a.device.clone()))
        }
        None if adapters.is_empty() => Err(Failure::Runtime(anyhow!(
            "--device wgpu:{n}: wgpu finds no adapter: is a Vulkan driver installed (on Linux, \
             Mesa's mesa-vulkan-drivers gives the software one, lavapipe), or Metal on macOS?"
        ))),
        None => {
            let names: Vec<String> = adapters
                .iter()
                .enumerate()
                .map(|(i, a)| format!("wgpu:{i} {}", a.info.name))
                .collect();
            Err(Failure::Runtime(anyhow!(
                "--device wgpu:{n}: there are {} adapters: {}",
                adapters.len(),
                names.join(", ")
            )))
        }
    }
}

/// Whether CUDA device `n` can run the backend: the driver library and NVRTC (which compiles the
/// backend's kernels) load, and the driver counts more than `n` devices. cubecl and cudarc panic
/// on the first use of a library that does not load.
#[cfg(feature = "cuda")]
fn cuda_device(n: usize) -> Result<(), String> {
    // SAFETY: both only try to load the libraries by their usual names; no symbol is called.
    let (driver, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(
            "the NVIDIA driver library (libcuda.so) does not load: is a GPU and its driver \
             installed, and is the library on LD_LIBRARY_PATH?"
                .into(),
        );
    }
    if !nvrtc {
        return Err(
            "the NVRTC library (libnvrtc.so, from the CUDA toolkit or the \
             nvidia-cuda-nvrtc wheel) does not load: put it on LD_LIBRARY_PATH"
                .into(),
        );
    }
    // NVRTC compiles every kernel with `#include <cuda_runtime.h>`, `cuda_bf16.h`, `mma.h`:
    // the headers must be there at run time, not only the libraries.
    let headers = cubecl_cuda::install::cuda_path().map(|p| p.join("include"));
    if !headers
        .as_ref()
        .is_some_and(|p| p.join("cuda_runtime.h").is_file())
    {
        let looked = headers.map_or_else(
            || "$CUDA_PATH, /usr/local/cuda, /opt/cuda and /usr (with /usr/bin/nvcc)".into(),
            |p| p.display().to_string(),
        );
        return Err(format!(
            "the CUDA headers (cuda_runtime.h, cuda_bf16.h, mma.h), which NVRTC compiles every \
             kernel with, are not in {looked}: install the CUDA toolkit (its headers too) and \
             set CUDA_PATH to the directory that holds its include/"
        ));
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| format!("the CUDA driver did not start: {e:?}"))?;
    if n >= count.max(0) as usize {
        return Err(format!("this machine has {count} CUDA device(s)"));
    }
    Ok(())
}
