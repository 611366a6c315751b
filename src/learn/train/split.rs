//! The stratified train/dev split: every class keeps at least one message
//! on each side, reproducibly from the seed.

use super::rng::Rng;

/// Indices of a stratified split: (train, dev).
pub fn stratified_split(labels: &[usize], classes: usize, fraction: f32, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let (mut train, mut dev) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        rng.shuffle(&mut idx);
        let k =
            if idx.len() >= 2 { ((idx.len() as f32 * fraction).round() as usize).clamp(1, idx.len() - 1) } else { 0 };
        dev.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    dev.sort_unstable();
    (train, dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_and_keeps_every_class_in_train() {
        let y: Vec<usize> = (0..100).map(|i| if i < 90 { 0 } else { 1 }).collect();
        let (tr, dev) = stratified_split(&y, 2, 0.2, 1);
        assert_eq!(tr.len() + dev.len(), 100);
        assert_eq!(dev.iter().filter(|&&i| y[i] == 1).count(), 2);
        assert!(tr.iter().any(|&i| y[i] == 1));
    }
}
