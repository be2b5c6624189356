//! `--device auto|cpu|cuda[:N]`: which backend runs the command. Everything below the CLI is
//! generic over the backend; this is where one is picked.

use swift_rs::config::Device;

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

pub fn resolve(arg: Device) -> Result<Resolved, super::Failure> {
    match arg {
        Device::Cpu => Ok(Resolved::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => cuda_device(n)
            .map(|()| Resolved::Cuda(n))
            .map_err(|e| super::Failure::Runtime(anyhow::anyhow!("--device cuda:{n}: {e}"))),
        #[cfg(feature = "cuda")]
        Device::Auto if cuda_device(0).is_ok() => Ok(Resolved::Cuda(0)),
        Device::Auto => Ok(Resolved::Cpu),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(super::Failure::Usage(anyhow::anyhow!(
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
