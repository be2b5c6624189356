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
        DeviceArg::Cuda(n) => Ok(Resolved::Cuda(n)),
        #[cfg(feature = "cuda")]
        DeviceArg::Auto if cuda_present() => Ok(Resolved::Cuda(0)),
        DeviceArg::Auto => Ok(Resolved::Cpu),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda(_) => Err(super::Failure::Usage(anyhow::anyhow!(
            "--device cuda: this binary was built without CUDA (rebuild with `--features cuda`)"
        ))),
    }
}

/// The NVIDIA driver exposes its devices here; without one the CUDA runtime cannot start.
#[cfg(feature = "cuda")]
fn cuda_present() -> bool {
    std::path::Path::new("/dev/nvidia0").exists()
}
