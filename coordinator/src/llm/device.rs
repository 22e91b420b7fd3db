//! Where the LLM runs: the quantized CPU decoder, or burn on a GPU.
//!
//! `auto` (the default) takes a CUDA GPU when the build has the `cuda` feature and the machine
//! has one, and the CPU otherwise. It never picks wgpu by itself: the adapters a CPU-only
//! machine offers (lavapipe, small integrated GPUs) run the f32 burn decoder slower than the
//! quantized CPU decoder runs the GGUF weights. `gpu` asks for the build's GPU backend (CUDA,
//! else wgpu) and is an error where there is none.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which device the LLM is asked to run on (`[generator] device`, `--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// A CUDA GPU when this build and machine have one, else the CPU.
    #[default]
    Auto,
    /// The quantized CPU decoder.
    Cpu,
    /// The build's GPU backend (CUDA with the `cuda` feature, else wgpu); an error without one.
    Gpu,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<DeviceChoice> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "gpu" => Ok(DeviceChoice::Gpu),
            other => Err(Error::Device(format!(
                "unknown device {other:?}: expected auto, cpu or gpu"
            ))),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Gpu => "gpu",
        })
    }
}

/// What this build and machine offer, as [`resolve_with`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The build has the `cuda` feature and the machine a CUDA device.
    pub cuda: bool,
    /// A wgpu adapter exists (a GPU, or Mesa's lavapipe on the CPU).
    pub wgpu: bool,
}

/// The backend a choice lands on, given what is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Flex: the quantized CPU decoder for inference, burn on the CPU for training.
    Cpu,
    /// CUDA device 0: burn for everything.
    Cuda,
    /// The default wgpu adapter: burn for everything.
    Wgpu,
}

impl Placement {
    /// The burn device of this placement.
    pub fn device(self) -> Device {
        match self {
            Placement::Cpu => Device::flex(),
            Placement::Cuda => super::default_gpu_device(),
            Placement::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Cpu => "CPU (quantized decoder)",
            Placement::Cuda => "CUDA device 0 (burn)",
            Placement::Wgpu => "wgpu default adapter (burn)",
        })
    }
}

/// The rule, apart from probing the machine (tested on every combination).
pub fn resolve_with(choice: DeviceChoice, offer: Offer) -> Result<Placement> {
    match choice {
        DeviceChoice::Cpu => Ok(Placement::Cpu),
        DeviceChoice::Auto if offer.cuda => Ok(Placement::Cuda),
        DeviceChoice::Auto => Ok(Placement::Cpu),
        DeviceChoice::Gpu if offer.cuda => Ok(Placement::Cuda),
        DeviceChoice::Gpu if offer.wgpu && !cfg!(feature = "cuda") => Ok(Placement::Wgpu),
        DeviceChoice::Gpu => Err(Error::Device(if cfg!(feature = "cuda") {
            "device = \"gpu\": this build has CUDA but the machine has no CUDA device \
             (NVIDIA driver and libcuda.so); use \"auto\" or \"cpu\""
                .into()
        } else {
            "device = \"gpu\": no wgpu adapter found, and this build has no CUDA \
             (build with --features crosslm-coordinator/cuda); use \"auto\" or \"cpu\""
                .into()
        })),
    }
}

/// The placement of `choice` on this machine, with a log line saying which. Only what the
/// choice can land on is probed: wgpu's adapters (loading the Vulkan drivers) only for `gpu`
/// in a build without CUDA.
pub fn resolve(choice: DeviceChoice) -> Result<Placement> {
    let offer = Offer {
        cuda: choice != DeviceChoice::Cpu && cuda_present(),
        wgpu: choice == DeviceChoice::Gpu
            && !cfg!(feature = "cuda")
            && crosslm_sdk::slm::wgpu_available(),
    };
    let placement = resolve_with(choice, offer)?;
    tracing::info!(asked = %choice, on = %placement, "LLM device");
    Ok(placement)
}

/// Whether this build has the `cuda` feature and the machine a CUDA device. Probing loads the
/// driver, which can panic inside the backend where none is installed; that counts as none.
#[cfg(feature = "cuda")]
pub fn cuda_present() -> bool {
    use std::sync::OnceLock;
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        std::panic::catch_unwind(|| {
            !Device::enumerate(burn::tensor::DeviceType::Cuda)
                .into_vec()
                .is_empty()
        })
        .unwrap_or(false)
    })
}

/// Whether this build has the `cuda` feature and the machine a CUDA device: never, without it.
#[cfg(not(feature = "cuda"))]
pub fn cuda_present() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Gpu] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
        assert_eq!("GPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Gpu);
        let e = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("auto, cpu or gpu"), "{e}");
        #[derive(Deserialize)]
        struct T {
            device: DeviceChoice,
        }
        let t: T = toml::from_str("device = \"cpu\"").unwrap();
        assert_eq!(t.device, DeviceChoice::Cpu);
        assert!(toml::from_str::<T>("device = \"fast\"").is_err());
    }

    /// Auto takes CUDA only; it never lands on wgpu. Gpu fails with a reason where nothing
    /// fits.
    #[test]
    fn the_rule_on_every_offer() {
        let offer = |cuda, wgpu| Offer { cuda, wgpu };
        for wgpu in [false, true] {
            assert_eq!(
                resolve_with(DeviceChoice::Auto, offer(false, wgpu)).unwrap(),
                Placement::Cpu
            );
            assert_eq!(
                resolve_with(DeviceChoice::Auto, offer(true, wgpu)).unwrap(),
                Placement::Cuda
            );
            for cuda in [false, true] {
                assert_eq!(
                    resolve_with(DeviceChoice::Cpu, offer(cuda, wgpu)).unwrap(),
                    Placement::Cpu
                );
            }
            assert_eq!(
                resolve_with(DeviceChoice::Gpu, offer(true, wgpu)).unwrap(),
                Placement::Cuda
            );
        }
        let none = resolve_with(DeviceChoice::Gpu, offer(false, false))
            .unwrap_err()
            .to_string();
        assert!(none.contains("device = \"gpu\""), "{none}");
        if !cfg!(feature = "cuda") {
            assert_eq!(
                resolve_with(DeviceChoice::Gpu, offer(false, true)).unwrap(),
                Placement::Wgpu
            );
        }
    }

    /// On this machine: probing never panics, and auto resolves (CPU where no CUDA device).
    #[test]
    fn probing_this_machine() {
        let placement = resolve(DeviceChoice::Auto).unwrap();
        assert_eq!(placement == Placement::Cuda, cuda_present());
        assert_eq!(resolve(DeviceChoice::Cpu).unwrap().device(), Device::flex());
    }
}
