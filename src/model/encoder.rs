//! The sentence encoder: a BERT-family model in Candle, mean-pooled and
//! L2-normalised, as sentence-transformers does it.
//!
//! One sequence per forward pass, so no padding and no attention mask: on
//! CPU, padded batches cost more than they save (measured for issue 4).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerImpl, TruncationParams};

use super::cpu_bert::{CpuBert, Shape};
use super::int8::Isa;
use super::unigram::CompactUnigram;
use super::weights::WeightsFile;
use super::ModelError;
use crate::settings::Precision;

/// Characters kept per token of budget before tokenising (see `token_ids`).
const CHARS_PER_TOKEN_BOUND: usize = 24;

/// The three files a model directory must hold.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// The `tokenizers` pipeline around our compact Unigram model.
type CompactTokenizer =
    TokenizerImpl<CompactUnigram, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// The crate's tokenizer, or the same pipeline with [`CompactUnigram`] for
/// large SentencePiece vocabularies (XLM-R's: ~300 MB less resident).
enum Tok {
    Standard(Box<Tokenizer>),
    Compact(Box<CompactTokenizer>),
}

impl Tok {
    /// Reads tokenizer.json; a Unigram model (without byte fallback) gets
    /// the compact model, every other component is the crate's own.
    fn from_file(path: &Path, max_tokens: usize) -> Result<Tok, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let truncation = Some(TruncationParams { max_length: max_tokens, ..Default::default() });
        let Some(model) = CompactUnigram::from_json(&json["model"]) else {
            drop(json);
            let mut t = Tokenizer::from_bytes(text.as_bytes()).map_err(|e| e.to_string())?;
            t.with_truncation(truncation).map_err(|e| e.to_string())?;
            t.with_padding(None);
            return Ok(Tok::Standard(Box::new(t)));
        };
        let model = model?;
        drop(text);
        // Deserialised from the parsed tree by reference: the normalizer's
        // precompiled character map alone is hundreds of kilobytes.
        fn part<T: serde::de::DeserializeOwned>(json: &serde_json::Value, key: &str) -> Result<Option<T>, String> {
            match &json[key] {
                serde_json::Value::Null => Ok(None),
                v => T::deserialize(v).map(Some).map_err(|e| format!("`{key}`: {e}")),
            }
        }
        let mut t = CompactTokenizer::new(model);
        t.with_normalizer(part::<NormalizerWrapper>(&json, "normalizer")?).map_err(|e| e.to_string())?;
        t.with_pre_tokenizer(part::<PreTokenizerWrapper>(&json, "pre_tokenizer")?);
        t.with_post_processor(part::<PostProcessorWrapper>(&json, "post_processor")?);
        t.with_decoder(part::<DecoderWrapper>(&json, "decoder")?);
        let added: Vec<AddedToken> = part(&json, "added_tokens")?.unwrap_or_default();
        let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) = added.into_iter().partition(|t| t.special);
        t.add_special_tokens(special).map_err(|e| e.to_string())?;
        t.add_tokens(plain).map_err(|e| e.to_string())?;
        t.with_truncation(truncation).map_err(|e| e.to_string())?;
        t.with_padding(None);
        Ok(Tok::Compact(Box::new(t)))
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = match self {
            Tok::Standard(t) => t.encode(text, true),
            Tok::Compact(t) => t.encode(text, true),
        };
        enc.map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }
}

/// The seam every caller goes through: text in, unit-length sentence
/// embeddings out. [`Encoder`] (a BERT-family model, our CPU forward pass
/// or Candle's) is today's; a GPU server, a larger model or another
/// architecture is another implementation, and no caller changes.
pub trait TextEncoder: Send + Sync {
    /// The embedding of each text, in order.
    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError>;
    /// The embedding of one text.
    fn embed(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        Ok(self.embed_batch(&[text])?.pop().unwrap_or_default())
    }
    /// Embedding width (384 for MiniLM-L6).
    fn dim(&self) -> usize;
    /// Tokens per text it reads; the rest is cut (part of an embedding cache's key).
    fn max_tokens(&self) -> usize;
    /// The arithmetic it computes in: `F32` or `Int8`.
    fn precision(&self) -> Precision;
    /// The model's id (`[model] id`): which encoder a head's embeddings and
    /// a cached or stored embedding came from.
    fn id(&self) -> &str;
}

/// One forward pass of a BERT-family model over token ids, mean-pooled and
/// unit-length: ours on CPU ([`CpuBert`]), Candle's elsewhere (CUDA).
trait ForwardPass: Send + Sync {
    fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError>;
    /// Bytes of weights held in memory, when known.
    fn weight_bytes(&self) -> Option<usize> {
        None
    }
}

impl ForwardPass for CpuBert {
    fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.embed(ids).map_err(ModelError::Inference)
    }

    fn weight_bytes(&self) -> Option<usize> {
        Some(CpuBert::weight_bytes(self))
    }
}

/// Candle's `BertModel` on its device, one sequence per pass (no padding,
/// so every token counts in the mean).
struct CandleBert {
    model: BertModel,
    device: Device,
}

impl ForwardPass for CandleBert {
    fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let run = || -> candle_core::Result<Vec<f32>> {
            let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
            let types = input.zeros_like()?;
            let hidden = self.model.forward(&input, &types, None)?; // [1, n, dim]
            let pooled = hidden.mean(1)?.squeeze(0)?;
            let norm = pooled.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12);
            (pooled / norm as f64)?.to_vec1::<f32>()
        };
        run().map_err(|e| ModelError::Inference(e.to_string()))
    }
}

pub struct Encoder {
    backend: Box<dyn ForwardPass>,
    tokenizer: Tok,
    dim: usize,
    /// Tokens per text, [CLS] and [SEP] included; the rest is cut.
    max_tokens: usize,
    /// What the forward pass computes in: `F32` or `Int8`, never `Auto`.
    precision: Precision,
    /// Put before every text (e5 models ask for `query: `).
    input_prefix: String,
    /// `[model] id`; the directory's name until [`with_id`](Encoder::with_id).
    id: String,
}

/// What `precision` means on this machine and device: `auto` is int8 where
/// the CPU has an integer dot product (else int8 is exact but no faster);
/// other devices run Candle's f32 model.
pub fn resolve_precision(precision: Precision, device: &Device) -> Precision {
    match precision {
        _ if !device.is_cpu() => Precision::F32,
        Precision::Auto if Isa::detect().int8_is_faster() => Precision::Int8,
        Precision::Auto => Precision::F32,
        p => p,
    }
}

impl Encoder {
    /// Loads a model directory. Each failure names the file at fault. On CPU
    /// the forward pass is [`CpuBert`] in the resolved `precision`; on other
    /// devices, Candle's `BertModel`.
    pub fn load(dir: &Path, max_tokens: usize, device: &Device, precision: Precision) -> Result<Encoder, ModelError> {
        Self::load_with(dir, max_tokens, device, device.is_cpu(), resolve_precision(precision, device))
    }

    /// As [`load`](Self::load), always with Candle's `BertModel` in f32 (the
    /// reference the fast path is measured and checked against).
    pub fn load_reference(dir: &Path, max_tokens: usize, device: &Device) -> Result<Encoder, ModelError> {
        Self::load_with(dir, max_tokens, device, false, Precision::F32)
    }

    fn load_with(
        dir: &Path,
        max_tokens: usize,
        device: &Device,
        fast_cpu: bool,
        precision: Precision,
    ) -> Result<Encoder, ModelError> {
        let file = |name: &str| -> Result<PathBuf, ModelError> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::MissingFile(p))
            }
        };
        let (config_path, tokenizer_path, weights_path) =
            (file("config.json")?, file("tokenizer.json")?, file("model.safetensors")?);
        let bad = |path: &PathBuf, reason: String| ModelError::BadFile { path: path.clone(), reason };

        let config_text = std::fs::read_to_string(&config_path).map_err(|e| bad(&config_path, e.to_string()))?;
        let config: BertConfig = serde_json::from_str(&config_text).map_err(|e| bad(&config_path, e.to_string()))?;
        if max_tokens < 3 || max_tokens > config.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "max_tokens = {max_tokens}: must be between 3 and the model's {}",
                config.max_position_embeddings
            )));
        }

        let tokenizer = Tok::from_file(&tokenizer_path, max_tokens).map_err(|e| bad(&tokenizer_path, e))?;

        let backend = if fast_cpu {
            let shape = Shape {
                hidden: config.hidden_size,
                heads: config.num_attention_heads,
                intermediate: config.intermediate_size,
                layers: config.num_hidden_layers,
                eps: config.layer_norm_eps,
            };
            let file = WeightsFile::open(&weights_path).map_err(|e| bad(&weights_path, e))?;
            Box::new(
                CpuBert::load(&file, &shape, precision == Precision::Int8)
                    .map_err(|e| bad(&weights_path, format!("does not hold a BERT model matching config.json: {e}")))?,
            ) as Box<dyn ForwardPass>
        } else {
            let tensors = candle_core::safetensors::load(&weights_path, device)
                .map_err(|e| bad(&weights_path, format!("not readable safetensors: {e}")))?;
            let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
            let model = BertModel::load(vb, &config)
                .map_err(|e| bad(&weights_path, format!("does not hold a BERT model matching config.json: {e}")))?;
            Box::new(CandleBert { model, device: device.clone() })
        };
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Encoder {
            backend,
            tokenizer,
            dim: config.hidden_size,
            max_tokens,
            precision,
            input_prefix: String::new(),
            id,
        })
    }

    /// Every text is embedded as `prefix + text` (`[model] input_prefix`).
    pub fn with_input_prefix(mut self, prefix: &str) -> Encoder {
        self.input_prefix = prefix.to_string();
        self
    }

    /// The id it is known by (`[model] id`).
    pub fn with_id(mut self, id: &str) -> Encoder {
        self.id = id.to_string();
        self
    }

    /// Bytes of encoder weights held in memory (our CPU forward pass only).
    pub fn weight_bytes(&self) -> Option<usize> {
        self.backend.weight_bytes()
    }

    /// Token ids of a text after truncation, special tokens included.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        // Tokenising 100k characters to keep 256 tokens wastes milliseconds per
        // message: cut the text first, far beyond what the tokens can cover
        // (a word-piece spans a few characters; only words of dozens of
        // characters in a row could make us keep fewer tokens).
        let cut = text.char_indices().nth(self.max_tokens * CHARS_PER_TOKEN_BOUND).map_or(text, |(i, _)| &text[..i]);
        let prefixed;
        let cut = if self.input_prefix.is_empty() {
            cut
        } else {
            prefixed = format!("{}{cut}", self.input_prefix);
            &prefixed
        };
        self.tokenizer.ids(cut).map_err(|e| ModelError::Inference(format!("tokenizer: {e}")))
    }

    /// The embedding of already-tokenised input.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.backend.embed_ids(ids)
    }
}

impl TextEncoder for Encoder {
    /// One sequence per pass: on CPU, padded batches cost more than they save.
    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        texts.iter().map(|t| self.embed(t)).collect()
    }

    /// The unit-length sentence embedding of a text.
    fn embed(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        let ids = self.token_ids(text)?;
        self.embed_ids(&ids)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Encoder::load(dir.path(), 256, &Device::Cpu, Precision::Auto).err().unwrap();
        assert!(err.to_string().contains("config.json"), "{err}");
        for f in MODEL_FILES {
            std::fs::write(dir.path().join(f), b"{not valid").unwrap();
        }
        let err = Encoder::load(dir.path(), 256, &Device::Cpu, Precision::Auto).err().unwrap();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
