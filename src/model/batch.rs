//! What the decoder takes in, built on the host: token ids padded into a batch, positions and
//! sample boundaries, and the label value that takes no loss. Host-only (no Burn), so `data`
//! builds batches without depending on the decoder.

/// Label value that takes no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A batch ready for the decoder: right-padded token ids, which positions are real tokens, the
/// position id of every token, and which sample of its row each token belongs to (packing puts
/// several samples in a row; attention never crosses them).
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    /// `attention_mask[row][t]`: false on padding.
    pub attention_mask: Vec<Vec<bool>>,
    pub position_ids: Vec<Vec<usize>>,
    /// `segment_ids[row][t]`: the sample of token t; all 0 for unpacked rows.
    pub segment_ids: Vec<Vec<u32>>,
}

impl Batch {
    /// Right-pads rows of different lengths; each row keeps the positions it would have alone.
    pub fn right_padded(rows: &[&[u32]]) -> Self {
        let bounds: Vec<[usize; 2]> = rows.iter().map(|r| [0, r.len()]).collect();
        let rows: Vec<(&[u32], &[usize])> = rows
            .iter()
            .zip(&bounds)
            .map(|(r, b)| (*r, &b[..]))
            .collect();
        Self::packed(&rows)
    }

    /// Left-pads rows of different lengths, so that every row's last token is the batch's last
    /// column (generation reads the next token there). Padding takes position 0; real tokens
    /// count from 0 as they would alone.
    pub fn left_padded(rows: &[&[u32]]) -> Self {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut batch = Self {
            input_ids: Vec::with_capacity(rows.len()),
            attention_mask: Vec::with_capacity(rows.len()),
            position_ids: Vec::with_capacity(rows.len()),
            segment_ids: vec![vec![0; seq]; rows.len()],
        };
        for ids in rows {
            let pad = seq - ids.len();
            let mut padded = vec![0; pad];
            padded.extend_from_slice(ids);
            batch.input_ids.push(padded);
            batch
                .attention_mask
                .push((0..seq).map(|t| t >= pad).collect());
            batch
                .position_ids
                .push((0..seq).map(|t| t.saturating_sub(pad)).collect());
        }
        batch
    }

    /// Rows of packed samples, each given with its sample boundaries (start of every sample, then
    /// the row's length); positions restart at every sample. Right-padded like `right_padded`.
    pub fn packed(rows: &[(&[u32], &[usize])]) -> Self {
        let seq = rows.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
        let mut batch = Self {
            input_ids: Vec::with_capacity(rows.len()),
            attention_mask: Vec::with_capacity(rows.len()),
            position_ids: Vec::with_capacity(rows.len()),
            segment_ids: Vec::with_capacity(rows.len()),
        };
        for (ids, bounds) in rows {
            assert_eq!(
                bounds.last().copied(),
                Some(ids.len()),
                "boundaries end at the row length"
            );
            let mut padded = ids.to_vec();
            padded.resize(seq, 0);
            batch.input_ids.push(padded);
            batch
                .attention_mask
                .push((0..seq).map(|t| t < ids.len()).collect());
            let (mut positions, mut segments) = (vec![0; seq], vec![0; seq]);
            for (k, w) in bounds.windows(2).enumerate() {
                for t in w[0]..w[1] {
                    positions[t] = t - w[0];
                    segments[t] = k as u32;
                }
            }
            batch.position_ids.push(positions);
            batch.segment_ids.push(segments);
        }
        batch
    }

    pub fn dims(&self) -> [usize; 2] {
        [
            self.input_ids.len(),
            self.input_ids.first().map_or(0, Vec::len),
        ]
    }
}
