//! `data.max_length` with `data.truncation`, and `data.packing`: samples packed into rows of at
//! most `max_length` tokens, best fit decreasing, with position ids restarting per sample and the
//! sample boundaries kept so attention stays inside each sample (a block-diagonal mask; ms-swift
//! #4736 is the bug of attending across them).

use super::encode::Encoded;
use crate::config::Truncation;
use crate::model::IGNORE_INDEX;

/// Applies `truncation`; None when the sample is deleted.
pub fn truncate(mut e: Encoded, max_length: usize, truncation: Truncation) -> Option<Encoded> {
    let n = e.input_ids.len();
    if n <= max_length {
        return Some(e);
    }
    match truncation {
        Truncation::Delete => None,
        Truncation::Right => {
            e.input_ids.truncate(max_length);
            e.labels.truncate(max_length);
            Some(e)
        }
        Truncation::Left => {
            e.input_ids.drain(..n - max_length);
            e.labels.drain(..n - max_length);
            Some(e)
        }
    }
}

/// Several samples in one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Restarting at 0 for every sample.
    pub position_ids: Vec<usize>,
    /// Start of each sample, then the total length (flash-attention's `cu_seqlens`).
    pub boundaries: Vec<usize>,
    /// Indices of the packed samples in the input, in row order.
    pub samples: Vec<usize>,
}

/// Best-fit-decreasing packing of samples (each at most `max_length` long) into rows of at most
/// `max_length` tokens. Deterministic: ties keep input order.
pub fn pack(samples: &[Encoded], max_length: usize) -> Vec<Packed> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    // Stable sort: equal lengths keep input order.
    order.sort_by_key(|&i| std::cmp::Reverse(samples[i].input_ids.len()));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new(); // (used, sample indices)
    for i in order {
        let len = samples[i].input_ids.len();
        assert!(len <= max_length, "samples are truncated before packing");
        // The fullest bin that still fits it.
        let best = bins
            .iter()
            .enumerate()
            .filter(|(_, (used, _))| used + len <= max_length)
            .max_by_key(|(b, (used, _))| (*used, std::cmp::Reverse(*b)))
            .map(|(b, _)| b);
        match best {
            Some(b) => {
                bins[b].0 += len;
                bins[b].1.push(i);
            }
            None => bins.push((len, vec![i])),
        }
    }
    bins.into_iter()
        .map(|(_, members)| {
            let mut p = Packed {
                input_ids: Vec::new(),
                labels: Vec::new(),
                position_ids: Vec::new(),
                boundaries: Vec::new(),
                samples: members.clone(),
            };
            for i in members {
                let s = &samples[i];
                p.boundaries.push(p.input_ids.len());
                p.input_ids.extend(&s.input_ids);
                p.position_ids.extend(0..s.input_ids.len());
                // The shifted loss would predict a sample's first token from the previous
                // sample's last one: never train that.
                p.labels.push(IGNORE_INDEX);
                p.labels.extend(&s.labels[1..]);
            }
            p.boundaries.push(p.input_ids.len());
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, base: u32) -> Encoded {
        Encoded {
            input_ids: (0..len as u32).map(|t| base + t).collect(),
            labels: (0..len as i64).map(|t| base as i64 + t).collect(),
        }
    }

    #[test]
    fn truncation_modes() {
        let e = sample(5, 10);
        assert_eq!(truncate(e.clone(), 5, Truncation::Delete), Some(e.clone()));
        assert_eq!(truncate(e.clone(), 3, Truncation::Delete), None);
        assert_eq!(
            truncate(e.clone(), 3, Truncation::Right).unwrap().input_ids,
            [10, 11, 12]
        );
        assert_eq!(
            truncate(e.clone(), 3, Truncation::Left).unwrap().labels,
            [12, 13, 14]
        );
    }

    #[test]
    fn best_fit_decreasing_with_restarting_positions_and_no_cross_sample_labels() {
        let samples = vec![
            sample(6, 100),
            sample(3, 200),
            sample(4, 300),
            sample(2, 400),
            sample(5, 500),
        ];
        let rows = pack(&samples, 10);
        // 6 -> bin0; 5 -> bin1; 4 -> bin0 (6+4=10); 3 -> bin1 (8); 2 -> bin1 (10)
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].samples, [0, 2]);
        assert_eq!(rows[1].samples, [4, 1, 3]);
        let r = &rows[1];
        assert_eq!(r.boundaries, [0, 5, 8, 10]);
        assert_eq!(r.position_ids, [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]);
        assert_eq!(r.input_ids[5..8], [200, 201, 202]);
        // The first label of every sample is ignored; the rest are the sample's own.
        assert_eq!(
            r.labels,
            [-100, 501, 502, 503, 504, -100, 201, 202, -100, 401]
        );
        let total: usize = rows.iter().map(|r| r.input_ids.len()).sum();
        assert_eq!(total, 20);
    }
}
