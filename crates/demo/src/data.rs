//! The handwritten digits data, embedded in the binary, and its seeded split.
//!
//! `data/digits.csv.gz`: Optical Recognition of Handwritten Digits (E. Alpaydin,
//! C. Kaynak, 1998), the 1,797-row test split of the UCI data set as distributed
//! with scikit-learn; CC BY 4.0, doi:10.24432/C50P49. Each row: 64 pixel values
//! (an 8x8 image, row-major, 0..16) and the class label (0..9).

use std::io::Read;

use ndarray::{Array2, Axis};
use rand::RngCore;
use rand_chacha::ChaCha8Rng;

use crate::DemoError;

/// The gzip-compressed CSV, embedded so the demo needs no file at run time.
pub static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../../data/digits.csv.gz");

/// Number of input features (8x8 pixels).
pub const NUM_FEATURES: usize = 64;
/// Number of classes (digits 0-9).
pub const NUM_CLASSES: usize = 10;

/// Examples with their labels: `x` is `n × 64`, pixels scaled to `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// One row per example.
    pub x: Array2<f32>,
    /// The class of each row (0..9).
    pub y: Vec<usize>,
}

impl Dataset {
    /// The embedded digits data (1,797 examples).
    pub fn digits() -> Result<Dataset, DemoError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
            .read_to_string(&mut text)
            .map_err(|e| DemoError::Data {
                line: 0,
                detail: format!("cannot decompress the embedded digits.csv.gz: {e}"),
            })?;
        Self::parse_csv(&text)
    }

    /// Parses rows of 64 pixel values (0..16) followed by a label (0..9).
    /// Errors name the 1-based line.
    pub fn parse_csv(text: &str) -> Result<Dataset, DemoError> {
        let mut pixels = Vec::new();
        let mut y = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let err = |detail: String| DemoError::Data {
                line: line_no,
                detail,
            };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != NUM_FEATURES + 1 {
                return Err(err(format!(
                    "expected {} comma-separated values, found {}",
                    NUM_FEATURES + 1,
                    fields.len()
                )));
            }
            for f in &fields[..NUM_FEATURES] {
                let v: u8 = f
                    .parse()
                    .map_err(|_| err(format!("pixel value `{f}` is not an integer")))?;
                if v > 16 {
                    return Err(err(format!("pixel value {v} is outside 0..=16")));
                }
                pixels.push(f32::from(v) / 16.0);
            }
            let label = fields[NUM_FEATURES];
            let c: usize = label
                .parse()
                .map_err(|_| err(format!("label `{label}` is not an integer")))?;
            if c >= NUM_CLASSES {
                return Err(err(format!("label {c} is outside 0..=9")));
            }
            y.push(c);
        }
        let x = Array2::from_shape_vec((y.len(), NUM_FEATURES), pixels).map_err(|e| {
            DemoError::Data {
                line: 0,
                detail: e.to_string(),
            }
        })?;
        Ok(Dataset { x, y })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            x: self.x.select(Axis(0), indices),
            y: indices.iter().map(|&i| self.y[i]).collect(),
        }
    }

    /// The examples whose class satisfies `keep`, in order.
    pub fn filter_classes(&self, keep: impl Fn(usize) -> bool) -> Dataset {
        let idx: Vec<usize> = (0..self.len()).filter(|&i| keep(self.y[i])).collect();
        self.select(&idx)
    }

    /// A seeded shuffle split: `(train, test)` with `test_fraction` of the
    /// examples (rounded down) in the test set.
    pub fn split(&self, test_fraction: f64, rng: &mut ChaCha8Rng) -> (Dataset, Dataset) {
        let idx = permutation(self.len(), rng);
        let n_test = ((self.len() as f64) * test_fraction.clamp(0.0, 1.0)) as usize;
        let (test, train) = idx.split_at(n_test);
        (self.select(train), self.select(test))
    }

    /// The first `per_class` examples of each class in a seeded shuffle
    /// (fewer where a class has fewer), in shuffled order.
    pub fn balanced_subset(&self, per_class: usize, rng: &mut ChaCha8Rng) -> Dataset {
        let mut counts = [0usize; NUM_CLASSES];
        let idx: Vec<usize> = permutation(self.len(), rng)
            .into_iter()
            .filter(|&i| {
                let c = &mut counts[self.y[i]];
                *c += 1;
                *c <= per_class
            })
            .collect();
        self.select(&idx)
    }
}

/// A seeded random permutation of `0..n` (Fisher-Yates). Indices are drawn
/// from `next_u64()` directly rather than through `rand`'s range sampling, so
/// the sequence cannot change with a `rand` release; the modulo bias is below
/// 2^-50 for the sizes used here.
pub fn permutation(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn embedded_data_has_every_row_and_class() {
        let d = Dataset::digits().unwrap();
        assert_eq!(d.len(), 1797);
        assert_eq!(d.x.dim(), (1797, 64));
        let mut counts = [0usize; 10];
        d.y.iter().for_each(|&c| counts[c] += 1);
        assert_eq!(counts.iter().sum::<usize>(), 1797);
        assert!(
            counts.iter().all(|&c| (170..=190).contains(&c)),
            "{counts:?}"
        );
        assert!(d.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let good = vec!["1"; 64].join(",") + ",3";
        let short = "1,2,3";
        let e = Dataset::parse_csv(&format!("{good}\n{short}\n")).unwrap_err();
        assert!(matches!(e, DemoError::Data { line: 2, .. }), "{e}");
        let bad_label = vec!["0"; 64].join(",") + ",12";
        let e = Dataset::parse_csv(&bad_label).unwrap_err();
        assert!(e.to_string().contains("label 12"), "{e}");
        let d = Dataset::parse_csv(&good).unwrap();
        assert_eq!(d.y, vec![3]);
        assert_eq!(d.x[[0, 5]], 1.0 / 16.0);
    }

    #[test]
    fn split_is_a_seeded_partition() {
        let d = Dataset::digits().unwrap();
        let (tr, te) = d.split(0.25, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(te.len(), 449);
        assert_eq!(tr.len() + te.len(), 1797);
        let (tr2, _) = d.split(0.25, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(tr, tr2);
        let (tr3, _) = d.split(0.25, &mut ChaCha8Rng::seed_from_u64(2));
        assert_ne!(tr, tr3);
        let mut p = permutation(100, &mut ChaCha8Rng::seed_from_u64(3));
        p.sort_unstable();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
        let sub = d.balanced_subset(7, &mut ChaCha8Rng::seed_from_u64(4));
        assert_eq!(sub.len(), 70);
        assert!((0..10).all(|c| sub.y.iter().filter(|&&y| y == c).count() == 7));
    }
}
