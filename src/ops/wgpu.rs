//! The adapters wgpu offers Burn's wgpu backend (Vulkan on Linux and Windows, Metal on macOS), so
//! a device can be picked by its place in the list and a missing one reported instead of Burn's
//! panic on first use.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
use burn::backend::wgpu::WgpuDevice;

/// One adapter: Burn's name for it, and wgpu's description (name, driver, type).
#[derive(Debug, Clone)]
pub struct WgpuAdapter {
    pub device: WgpuDevice,
    pub info: wgpu::AdapterInfo,
}

impl WgpuAdapter {
    /// A software rasteriser on the CPU (Mesa's lavapipe, SwiftShader): it runs the GPU path, but
    /// slower than the CPU backend.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }
}

/// Every adapter of the backend's graphics API, in wgpu's order. Burn selects adapters by type
/// and rank within it (`DiscreteGpu(1)`); each is named here that way.
pub fn wgpu_adapters() -> Vec<WgpuAdapter> {
    let backend = AutoGraphicsApi::backend();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let mut ranks = [0usize; 3];
    let mut rank = |kind: usize| {
        ranks[kind] += 1;
        ranks[kind] - 1
    };
    let mut cpu_seen = false;
    ready(instance.enumerate_adapters(backend.into()))
        .into_iter()
        .filter_map(|adapter| {
            let info = adapter.get_info();
            let device = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(rank(0)),
                wgpu::DeviceType::IntegratedGpu => WgpuDevice::IntegratedGpu(rank(1)),
                wgpu::DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(rank(2)),
                // Burn reaches only the first CPU adapter, and none of type Other by rank.
                wgpu::DeviceType::Cpu if !cpu_seen => {
                    cpu_seen = true;
                    WgpuDevice::Cpu
                }
                _ => return None,
            };
            Some(WgpuAdapter { device, info })
        })
        .collect()
}

/// The value of a future that native wgpu returns ready (adapter enumeration is synchronous
/// there); polled until it is.
fn ready<T>(future: impl Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
            return value;
        }
        std::thread::yield_now();
    }
}

/// For the library's GPU tests: the first adapter, or None (saying so) when there is none and this
/// is not CI; with `CI=true` a missing adapter fails the test.
#[cfg(test)]
pub(crate) fn test_gpu() -> Option<WgpuDevice> {
    match wgpu_adapters().into_iter().next() {
        Some(a) => Some(a.device),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and wgpu finds no adapter: install mesa-vulkan-drivers")
        }
        None => {
            crate::say!("no wgpu adapter: skipped");
            None
        }
    }
}
