//! flotilla: federates Istio service meshes across Kubernetes clusters.
//!
//! Data flow (see docs/architecture.md): inputs (files for `render`, watches for `run`) →
//! `model::Fleet` → pure `compute::Engine` → `compute::plan` → writer or printer.

pub mod cli;
pub mod compute;
pub mod controller;
pub mod crd;
pub mod fleet_dir;
pub mod istio;
pub mod model;
pub mod register;
pub mod render;
pub mod settings;
pub mod synth;
pub mod yaml;
