//! `--device auto|cpu|cuda[:N]`: which backend runs the command. Everything below the CLI is
//! generic over the backend; this is where one is picked.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA when the binary has it and a GPU is present, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("\"{s}\" is not auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Calls the generic body with the backend and device that `arg` selects.
/// `$body` is a generic function `fn<B: Backend>(device: B::Device, ...) -> Result<T, Failure>`.
macro_rules! with_backend {
    ($arg:expr, $body:ident ( $($extra:expr),* )) => {{
        match $crate::cli::device::resolve($arg)? {
            $crate::cli::device::Resolved::Cpu => {
                $body::<burn::backend::Flex>(Default::default() $(, $extra)*)
            }
            #[cfg(feature = "cuda")]
            $crate::cli::device::Resolved::Cuda(n) => {
                $body::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(n) $(, $extra)*)
            }
        }
    }};
}
pub(crate) use with_backend;

pub enum Resolved {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

pub fn resolve(arg: DeviceArg) -> Result<Resolved, super::Failure> {
    match arg {
        DeviceArg::Cpu => Ok(Resolved::Cpu),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(n) => cuda_device(n)
            .map(|()| Resolved::Cuda(n))
            .map_err(|e| super::Failure::Runtime(anyhow::anyhow!("--device cuda:{n}: {e}"))),
        #[cfg(feature = "cuda")]
        DeviceArg::Auto if cuda_device(0).is_ok() => Ok(Resolved::Cuda(0)),
        DeviceArg::Auto => Ok(Resolved::Cpu),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda(_) => Err(super::Failure::Usage(anyhow::anyhow!(
            "--device cuda: this binary was built without CUDA (rebuild with `--features cuda`)"
        ))),
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
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| format!("the CUDA driver did not start: {e:?}"))?;
    if n >= count.max(0) as usize {
        return Err(format!("this machine has {count} CUDA device(s)"));
    }
    Ok(())
}
