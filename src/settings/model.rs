//! `[model]`: the embedded encoder and its heads.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::section::section;
use super::values::de_duration;

section! {
    /// The embedded classifier. Absent section: rules and the default only.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct ModelConfig in "model" {
        /// Hugging Face model id; also shown in `X-Triage-Source: model:<id>`.
        live id: String,
        /// A local directory with config.json, tokenizer.json, model.safetensors; wins over the hub cache.
        live path: Option<PathBuf>,
        /// Trained department head; without one, departments' descriptions give a cold-start classifier.
        live department_head: Option<PathBuf>,
        live priority_head: Option<PathBuf>,
        /// Tokens per message given to the encoder (`[CLS]` and `[SEP]` included).
        live max_tokens: usize,
        /// Text put before every message for the encoder: `"query: "` for the e5
        /// models (their model card asks for it); empty for MiniLM.
        live input_prefix: String,
        /// Dedicated inference threads.
        live workers: usize,
        /// Messages that may wait for inference; beyond, a message fails open at once.
        live queue_depth: usize,
        /// Longest a message waits for its embedding before it fails open.
        #[serde(deserialize_with = "de_duration")]
        live deadline: Duration,
        /// `cpu`, or `cuda` (needs a build with the `cuda` feature).
        live device: Device,
        /// `auto`, `f32` or `int8` (CPU only; `auto` is int8 where the CPU has VNNI).
        live precision: Precision,
        /// Embeddings kept for identical text (bulk mail); 0 disables the cache.
        live cache_entries: usize,
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            id: "sentence-transformers/all-MiniLM-L6-v2".into(),
            path: None,
            department_head: None,
            priority_head: None,
            max_tokens: 128,
            input_prefix: String::new(),
            workers: 2,
            queue_depth: 64,
            deadline: Duration::from_secs(2),
            device: Device::Cpu,
            precision: Precision::Auto,
            cache_entries: 10_000,
        }
    }
}

/// Where the encoder runs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    /// Candle's CUDA backend (a build with the `cuda` feature).
    Cuda,
}

/// The arithmetic of the encoder's linear layers on CPU.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `int8` where the CPU has an integer dot-product instruction (AVX-512
    /// VNNI or AVX-VNNI), else `f32`.
    #[default]
    Auto,
    /// Exact f32 everywhere (the reference).
    F32,
    /// 8-bit weights (per output channel) and activations (per token),
    /// 32-bit accumulation; word embeddings in 8 bits per row.
    Int8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
