//! Cold start: before any mail is labeled, each department is the mean
//! embedding of its `description` and `examples` from the config, and a
//! message goes to the nearest one (cosine similarity).
//!
//! Its confidences are a softmax over similarities with a fixed scale, not
//! calibrated on data: train a head as soon as there is labeled mail.

use super::encoder::TextEncoder;
use super::head::{softmax, Prediction};
use super::ModelError;

/// Similarity → logit scale (cosine differences are small; 20 spreads them).
const SCALE: f32 = 20.0;

pub struct Prototypes {
    labels: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

impl Prototypes {
    /// `departments`: (name, texts describing it). Departments without text
    /// are left out; at least two must remain.
    pub fn build(encoder: &dyn TextEncoder, departments: &[(String, Vec<String>)]) -> Result<Prototypes, ModelError> {
        let (mut labels, mut vectors) = (Vec::new(), Vec::new());
        for (name, texts) in departments {
            let texts: Vec<&String> = texts.iter().filter(|t| !t.trim().is_empty()).collect();
            if texts.is_empty() {
                continue;
            }
            let mut mean = vec![0f32; encoder.dim()];
            for t in &texts {
                for (m, v) in mean.iter_mut().zip(encoder.embed(t)?) {
                    *m += v;
                }
            }
            let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            mean.iter_mut().for_each(|x| *x /= norm);
            labels.push(name.clone());
            vectors.push(mean);
        }
        if labels.len() < 2 {
            return Err(ModelError::Config(
                "no trained department head, and fewer than two departments have a description or examples \
                 for the cold-start classifier"
                    .into(),
            ));
        }
        Ok(Prototypes { labels, vectors })
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn predict(&self, embedding: &[f32]) -> Prediction {
        let sims: Vec<f32> =
            self.vectors.iter().map(|v| v.iter().zip(embedding).map(|(a, b)| a * b).sum::<f32>() * SCALE).collect();
        let probs = softmax(&sims, 1.0);
        let (index, &confidence) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("two or more");
        Prediction { label: self.labels[index].clone(), index, confidence, probs }
    }
}
