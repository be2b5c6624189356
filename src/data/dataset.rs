//! From `[data]` to the rows training sees: read every `data.train` spec (with `#N` sampling),
//! split off `data.val_ratio` or read `data.val`, encode in parallel on every core, apply
//! `max_length` / `truncation`, pack when asked, and order each epoch (shuffled by `train.seed`
//! and the epoch, or file order). `data.streaming` does the same lazily through a shuffle buffer.
//! Rows that cannot be used stop the run or are counted, per `data.on_bad_row`.

use std::collections::VecDeque;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde_json::{json, Value};

use super::encode::{Encoded, EncodedPreference, Encoder, PreferenceRows};
use super::format::{parse_preference, parse_row, Preference};
use super::pack::{pack, truncate, Packed};
use super::source::{open_rows, DatasetSpec, RawRow, SpecSource};
use super::DataError;
use crate::config::{DataSection, OnBadRow};
use crate::model::{Batch, IGNORE_INDEX};

/// Rows encoded together (in parallel), and packed together when streaming.
const CHUNK: usize = 2048;
/// How many reasons a skipped-rows report keeps.
const REASONS_KEPT: usize = 5;

/// Rows that could not be used, under `on_bad_row = "skip"`, and rows dropped as longer than
/// `data.max_length` under `truncation = "delete"` (dropped whatever `on_bad_row` says, as
/// ms-swift drops them).
#[derive(Debug, Clone)]
pub struct BadRows {
    policy: OnBadRow,
    pub count: usize,
    /// The first few, as "file:line: reason".
    pub first: Vec<String>,
    pub too_long: usize,
}

impl BadRows {
    pub fn new(policy: OnBadRow) -> Self {
        Self {
            policy,
            count: 0,
            first: Vec::new(),
            too_long: 0,
        }
    }

    /// What was left out, for a person: None when every row was used.
    pub fn describe(&self, max_length: usize) -> Option<String> {
        let mut lines = Vec::new();
        if self.too_long > 0 {
            lines.push(format!(
                "dropped {} rows longer than data.max_length = {max_length} (data.truncation = \"delete\")",
                self.too_long
            ));
        }
        if self.count > 0 {
            lines.push(format!("skipped {} bad rows; the first:", self.count));
            lines.extend(self.first.iter().map(|reason| format!("  {reason}")));
        }
        (!lines.is_empty()).then(|| lines.join("\n"))
    }

    /// Rows read but not used, for `DataError::NoRows`.
    fn unused(&self) -> usize {
        self.count + self.too_long
    }

    /// Counts a bad row under "skip"; any other error, or any error under "error", is returned.
    fn handle(&mut self, error: DataError) -> Result<(), DataError> {
        match (&error, self.policy) {
            (DataError::BadRow { .. }, OnBadRow::Skip) => {
                self.count += 1;
                if self.first.len() < REASONS_KEPT {
                    self.first.push(error.to_string());
                }
                Ok(())
            }
            _ => Err(error),
        }
    }
}

/// A row training sees: one sample, several packed into one, a preference pair, or KTO's one
/// answer, desirable or not, with where it starts.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainRow {
    Sample(Encoded),
    Packed(Packed),
    Pair {
        chosen: Encoded,
        rejected: Encoded,
    },
    Unpaired {
        sequence: Encoded,
        prompt_len: usize,
        desirable: bool,
    },
}

/// One sequence of a row: its ids, labels, and where each of its samples starts then its length.
struct Sequence<'r> {
    input_ids: &'r [u32],
    labels: &'r [i64],
    /// Packed rows' own; a single sample's made here.
    boundaries: std::borrow::Cow<'r, [usize]>,
}

impl<'r> Sequence<'r> {
    fn of(e: &'r Encoded) -> Self {
        Self {
            input_ids: &e.input_ids,
            labels: &e.labels,
            boundaries: vec![0, e.input_ids.len()].into(),
        }
    }
}

impl TrainRow {
    /// Its tokens (both sequences of a pair).
    pub fn tokens(&self) -> usize {
        self.sequences().iter().map(|s| s.input_ids.len()).sum()
    }

    /// Its tokens that take loss.
    pub fn label_tokens(&self) -> usize {
        let sequences = self.sequences();
        let labels = sequences.iter().flat_map(|s| s.labels);
        labels.filter(|&&l| l != IGNORE_INDEX).count()
    }

    fn sequences(&self) -> Vec<Sequence<'_>> {
        match self {
            Self::Sample(s) => vec![Sequence::of(s)],
            Self::Packed(p) => vec![Sequence {
                input_ids: &p.input_ids,
                labels: &p.labels,
                boundaries: p.boundaries.as_slice().into(),
            }],
            Self::Pair { chosen, rejected } => vec![Sequence::of(chosen), Sequence::of(rejected)],
            Self::Unpaired { sequence, .. } => vec![Sequence::of(sequence)],
        }
    }

    /// `swift-rs encode`'s line: input_ids and labels, position_ids when packed, each answer's
    /// for a pair.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Sample(s) => json!({"input_ids": s.input_ids, "labels": s.labels}),
            Self::Packed(p) => json!({
                "input_ids": p.input_ids,
                "labels": p.labels,
                "position_ids": p.position_ids,
            }),
            Self::Pair { chosen, rejected } => json!({
                "chosen_input_ids": chosen.input_ids,
                "chosen_labels": chosen.labels,
                "rejected_input_ids": rejected.input_ids,
                "rejected_labels": rejected.labels,
            }),
            Self::Unpaired {
                sequence,
                desirable,
                ..
            } => json!({
                "input_ids": sequence.input_ids,
                "labels": sequence.labels,
                "label": desirable,
            }),
        }
    }
}

/// Rows to one batch padded to its longest sequence (dynamic padding), with labels padded by -100
/// to the same length; packed rows keep attention inside each sample. Pairs give two sequences
/// each, every chosen answer first, then every rejected one (TRL's concatenated batch).
pub fn collate(rows: &[&TrainRow]) -> (Batch, Vec<Vec<i64>>) {
    let per_row: Vec<Vec<Sequence>> = rows.iter().map(|r| r.sequences()).collect();
    let width = per_row.iter().map(Vec::len).max().unwrap_or(1);
    let sequences: Vec<&Sequence> = (0..width)
        .flat_map(|k| per_row.iter().filter_map(move |s| s.get(k)))
        .collect();
    let parts: Vec<(&[u32], &[usize])> = sequences
        .iter()
        .map(|s| (s.input_ids, s.boundaries.as_ref()))
        .collect();
    let batch = Batch::packed(&parts);
    let seq = batch.input_ids.first().map_or(0, Vec::len);
    let labels = sequences
        .iter()
        .map(|s| {
            let mut l = s.labels.to_vec();
            l.resize(seq, IGNORE_INDEX);
            l
        })
        .collect();
    (batch, labels)
}

/// KTO's mismatched answers, from which its KL term is estimated: each unpaired row's prompt
/// followed by the answer of the row before it among `rows` (the first takes the last's), cut
/// to `max_length`; TRL rotates the answers of a batch so, ms-swift those of an optimizer step.
/// Labels are the prompt's then the answer's.
pub fn kl_rows(rows: &[&TrainRow], max_length: usize) -> Vec<TrainRow> {
    let parts: Vec<(&Encoded, usize)> = rows
        .iter()
        .map(|r| match r {
            TrainRow::Unpaired {
                sequence,
                prompt_len,
                ..
            } => (sequence, *prompt_len),
            _ => unreachable!("KL rows are made of unpaired rows"),
        })
        .collect();
    (0..parts.len())
        .map(|i| {
            let (prompt, p) = parts[i];
            let (answer, a) = parts[(i + parts.len() - 1) % parts.len()];
            let ids = prompt.input_ids[..p].iter().chain(&answer.input_ids[a..]);
            let labels = prompt.labels[..p].iter().chain(&answer.labels[a..]);
            TrainRow::Sample(Encoded {
                input_ids: ids.take(max_length).copied().collect(),
                labels: labels.take(max_length).copied().collect(),
            })
        })
        .collect()
}

/// A dataset read whole.
#[derive(Debug)]
pub struct Dataset {
    pub train: Vec<TrainRow>,
    pub val: Vec<TrainRow>,
    pub bad_rows: BadRows,
    shuffle: bool,
    seed: u64,
}

impl Dataset {
    /// Reads, splits and encodes `data` (not streaming); `seed` is `train.seed`.
    pub fn build(data: &DataSection, seed: u64, encoder: &Encoder) -> Result<Self, DataError> {
        let mut bad_rows = BadRows::new(data.on_bad_row);
        let mut train_rows = read_specs(&data.train, data, seed, &mut bad_rows)?;
        let mut val_rows = read_specs(&data.val, data, seed, &mut bad_rows)?;
        if data.val.is_empty() && data.val_ratio > 0.0 {
            (train_rows, val_rows) = split(train_rows, data.val_ratio, seed);
        }
        let train = training_rows(&train_rows, data, encoder, &mut bad_rows)?;
        let val = training_rows(&val_rows, data, encoder, &mut bad_rows)?;
        if train.is_empty() {
            return Err(DataError::NoRows {
                what: "data.train".into(),
                skipped: bad_rows.unused(),
            });
        }
        Ok(Self {
            train,
            val,
            bad_rows,
            shuffle: data.shuffle,
            seed,
        })
    }

    /// The validation rows alone (`data.val`), read whole: a stream's.
    pub fn validation(
        data: &DataSection,
        seed: u64,
        encoder: &Encoder,
    ) -> Result<Vec<TrainRow>, DataError> {
        let mut bad_rows = BadRows::new(data.on_bad_row);
        let rows = read_specs(&data.val, data, seed, &mut bad_rows)?;
        training_rows(&rows, data, encoder, &mut bad_rows)
    }

    /// The order of `train` in epoch `epoch` (from 0): a permutation drawn from `train.seed` and
    /// the epoch when `data.shuffle`, else file order.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(self.seed.wrapping_add(epoch)));
        }
        order
    }
}

/// Packs the samples when `data.packing`, else keeps each as its own row.
fn rows_for_training(samples: Vec<Encoded>, data: &DataSection) -> Vec<TrainRow> {
    if data.packing {
        pack(&samples, data.max_length)
            .into_iter()
            .map(TrainRow::Packed)
            .collect()
    } else {
        samples.into_iter().map(TrainRow::Sample).collect()
    }
}

/// All rows of the specs, in order, each spec sampled to its `#N`.
fn read_specs(
    specs: &[String],
    data: &DataSection,
    seed: u64,
    bad_rows: &mut BadRows,
) -> Result<Vec<RawRow>, DataError> {
    let mut all = Vec::new();
    for spec in specs {
        let spec = DatasetSpec::parse(spec);
        let mut rows = Vec::new();
        for row in SpecRows::new(spec.source(data)?) {
            match row {
                Ok(row) => rows.push(row),
                Err(e) => bad_rows.handle(e)?,
            }
        }
        if let Some(n) = spec.sample {
            rows = sample(rows, n, seed);
        }
        all.extend(rows);
    }
    Ok(all)
}

/// ms-swift's `path#N`: N rows drawn without replacement when N is below the size; above it, the
/// whole dataset repeated N / size times, then the rest drawn without replacement.
fn sample<T: Clone>(rows: Vec<T>, n: usize, seed: u64) -> Vec<T> {
    if rows.is_empty() {
        return rows;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut picked = Vec::with_capacity(n);
    for _ in 0..n / rows.len() {
        picked.extend(rows.iter().cloned());
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.shuffle(&mut rng);
    picked.extend(order[..n % rows.len()].iter().map(|&i| rows[i].clone()));
    picked
}

/// (train, val): `ceil(ratio * n)` rows drawn for validation by `seed`; both keep file order.
fn split<T>(rows: Vec<T>, ratio: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n_val = ((rows.len() as f64 * ratio).ceil() as usize).min(rows.len().saturating_sub(1));
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut is_val = vec![false; rows.len()];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (row, v) in rows.into_iter().zip(is_val) {
        if v {
            val.push(row);
        } else {
            train.push(row);
        }
    }
    (train, val)
}

/// Encodes rows on every core (`data.num_proc` threads when set); results keep input order, and
/// bad rows are reported in order.
/// The rows encoded (as preference pairs when the encoder reads preference rows) and, when
/// `data.packing`, packed.
fn training_rows(
    rows: &[RawRow],
    data: &DataSection,
    encoder: &Encoder,
    bad_rows: &mut BadRows,
) -> Result<Vec<TrainRow>, DataError> {
    if encoder.reads_preferences().is_some() {
        return encode_all(rows, data, bad_rows, |row| encode_pair(row, data, encoder));
    }
    let samples = encode_all(rows, data, bad_rows, |row| encode_one(row, data, encoder))?;
    Ok(rows_for_training(samples, data))
}

/// `encode` on every row, in parallel (`data.num_proc` threads); a row it cannot encode is a bad
/// row, one it drops (None) a row too long.
fn encode_all<T: Send>(
    rows: &[RawRow],
    data: &DataSection,
    bad_rows: &mut BadRows,
    encode: impl Fn(&RawRow) -> Result<Option<T>, String> + Sync,
) -> Result<Vec<T>, DataError> {
    let encode_each =
        || -> Vec<Result<Option<T>, String>> { rows.par_iter().map(&encode).collect() };
    let pool = data.num_proc.map(|n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("encode-{i}"))
            .build()
    });
    let results = match pool {
        Some(Ok(pool)) => pool.install(encode_each),
        // No thread could be started for a pool of its own: the shared one encodes.
        Some(Err(_)) | None => encode_each(),
    };
    let mut encoded = Vec::with_capacity(rows.len());
    for (row, result) in rows.iter().zip(results) {
        match result {
            Ok(Some(e)) => encoded.push(e),
            Ok(None) => bad_rows.too_long += 1,
            Err(reason) => bad_rows.handle(DataError::BadRow {
                path: row.path.to_path_buf(),
                at: row.at,
                reason,
            })?,
        }
    }
    Ok(encoded)
}

/// A preference row encoded, each answer truncated; None when `truncation = "delete"` drops
/// either as too long.
fn encode_pair(
    row: &RawRow,
    data: &DataSection,
    encoder: &Encoder,
) -> Result<Option<TrainRow>, String> {
    let cut = |e| truncate(e, data.max_length, data.truncation);
    let takes_loss = |answer: &str, e: &Encoded| match e.labels.iter().all(|&l| l == IGNORE_INDEX) {
        true => Err(format!(
            "the {answer} answer takes no loss (after truncation)"
        )),
        false => Ok(()),
    };
    // The kind is the parsed row's: a row of the other kind is refused before it is tokenized.
    let preference = parse_preference(&row.value)?;
    let unpaired = matches!(preference, Preference::Unpaired { .. });
    match (unpaired, encoder.reads_preferences()) {
        (false, Some(PreferenceRows::Unpaired)) => {
            return Err(
                "a preference pair: rlhf.type = \"kto\" takes rows with a \"label\" \
                        (one answer, desirable or not)"
                    .into(),
            )
        }
        (true, Some(PreferenceRows::Pairs)) => {
            return Err("a KTO row (with \"label\"): set rlhf.type = \"kto\", or give pairs".into())
        }
        _ => {}
    }
    match encoder.encode_preference(&preference)? {
        EncodedPreference::Pair { chosen, rejected } => {
            let (Some(chosen), Some(rejected)) = (cut(chosen), cut(rejected)) else {
                return Ok(None);
            };
            takes_loss("chosen", &chosen)?;
            takes_loss("rejected", &rejected)?;
            Ok(Some(TrainRow::Pair { chosen, rejected }))
        }
        EncodedPreference::Unpaired {
            sequence,
            prompt_len,
            desirable,
        } => {
            let Some(sequence) = cut(sequence) else {
                return Ok(None);
            };
            takes_loss(
                if desirable {
                    "desirable"
                } else {
                    "undesirable"
                },
                &sequence,
            )?;
            Ok(Some(TrainRow::Unpaired {
                prompt_len: prompt_len.min(sequence.input_ids.len()),
                sequence,
                desirable,
            }))
        }
    }
}

/// The row encoded and truncated; None when `truncation = "delete"` drops it as too long.
fn encode_one(
    row: &RawRow,
    data: &DataSection,
    encoder: &Encoder,
) -> Result<Option<Encoded>, String> {
    let encoded = encoder.encode(&parse_row(&row.value)?)?;
    let Some(kept) = truncate(encoded, data.max_length, data.truncation) else {
        return Ok(None);
    };
    if kept.labels.iter().all(|&l| l == IGNORE_INDEX) {
        return Err("no token takes loss (after truncation)".into());
    }
    Ok(Some(kept))
}

/// `data.streaming`: the train rows of one pass over the specs, read lazily. Rows go through a
/// shuffle buffer of `data.shuffle_buffer_size` rows when `data.shuffle`, are encoded `CHUNK` at a time in
/// parallel, and are packed within each chunk. Memory stays bounded whatever the file sizes
/// (except .json arrays, which are read whole).
pub struct Stream<'a> {
    data: &'a DataSection,
    encoder: &'a Encoder,
    source: Box<dyn Iterator<Item = Result<RawRow, DataError>> + Send + 'a>,
    buffer: Vec<RawRow>,
    rng: Option<StdRng>,
    ready: VecDeque<TrainRow>,
    pub bad_rows: BadRows,
    rows_out: usize,
    failed: bool,
}

impl<'a> Stream<'a> {
    /// Pass `epoch` (from 0) over `data.train`; `seed` is `train.seed`.
    pub fn new(
        data: &'a DataSection,
        seed: u64,
        epoch: u64,
        encoder: &'a Encoder,
    ) -> Result<Self, DataError> {
        let mut sources = Vec::new();
        for spec in &data.train {
            let spec = DatasetSpec::parse(spec);
            let rows = SpecRows::new(spec.source(data)?);
            sources.push(match spec.sample {
                Some(n) => Box::new(rows.cycle_take(n)) as Box<dyn Iterator<Item = _> + Send>,
                None => Box::new(rows),
            });
        }
        Ok(Self {
            data,
            encoder,
            source: Box::new(sources.into_iter().flatten()),
            buffer: Vec::new(),
            rng: data
                .shuffle
                .then(|| StdRng::seed_from_u64(seed.wrapping_add(epoch))),
            ready: VecDeque::new(),
            bad_rows: BadRows::new(data.on_bad_row),
            rows_out: 0,
            failed: false,
        })
    }

    /// The next raw row: straight from the files, or drawn at random from the shuffle buffer.
    fn next_raw(&mut self) -> Option<Result<RawRow, DataError>> {
        let Some(rng) = self.rng.as_mut() else {
            return self.source.next();
        };
        while self.buffer.len() < self.data.shuffle_buffer_size {
            match self.source.next() {
                Some(Ok(row)) => self.buffer.push(row),
                Some(Err(e)) => return Some(Err(e)),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let i = rand::Rng::random_range(rng, 0..self.buffer.len());
        Some(Ok(self.buffer.swap_remove(i)))
    }

    /// Reads, encodes and (when packing) packs the next chunk; false at the end.
    fn fill(&mut self) -> Result<bool, DataError> {
        let mut rows = Vec::with_capacity(CHUNK);
        while rows.len() < CHUNK {
            match self.next_raw() {
                Some(Ok(row)) => rows.push(row),
                Some(Err(e)) => self.bad_rows.handle(e)?,
                None => break,
            }
        }
        if rows.is_empty() {
            return Ok(false);
        }
        let rows = training_rows(&rows, self.data, self.encoder, &mut self.bad_rows)?;
        self.ready.extend(rows);
        Ok(true)
    }
}

impl Iterator for Stream<'_> {
    type Item = Result<TrainRow, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.ready.is_empty() && !self.failed {
            match self.fill() {
                Ok(true) => {}
                Ok(false) if self.rows_out == 0 => {
                    self.failed = true;
                    return Some(Err(DataError::NoRows {
                        what: "data.train".into(),
                        skipped: self.bad_rows.unused(),
                    }));
                }
                Ok(false) => return None,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        let row = self.ready.pop_front()?;
        self.rows_out += 1;
        Some(Ok(row))
    }
}

/// The rows of a spec's files in order, opened one file at a time.
struct SpecRows {
    source: SpecSource,
    next_file: usize,
    current: Option<Box<dyn Iterator<Item = Result<RawRow, DataError>> + Send>>,
}

impl SpecRows {
    fn new(source: SpecSource) -> Self {
        Self {
            source,
            next_file: 0,
            current: None,
        }
    }

    /// The first `n` rows, starting over at the first file when the files run out (streaming's
    /// `#N`: no sampling without reading everything first).
    fn cycle_take(self, n: usize) -> impl Iterator<Item = Result<RawRow, DataError>> + Send {
        let source = self.source.clone();
        let mut pass = self;
        let mut in_pass = 0;
        std::iter::from_fn(move || loop {
            match pass.next() {
                Some(row) => {
                    in_pass += 1;
                    return Some(row);
                }
                // An empty pass would repeat forever.
                None if in_pass == 0 => return None,
                None => {
                    pass = SpecRows::new(source.clone());
                    in_pass = 0;
                }
            }
        })
        .take(n)
    }
}

impl Iterator for SpecRows {
    type Item = Result<RawRow, DataError>;

    /// The next row, prepared as its dataset's registration says.
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.current.as_mut().and_then(Iterator::next) {
                return Some(row.map(|mut row| {
                    row.value = self.source.prepare.apply(row.value);
                    row
                }));
            }
            let file = self.source.files.get(self.next_file)?;
            self.next_file += 1;
            match open_rows(Path::new(file), &self.source.columns) {
                Ok(rows) => self.current = Some(rows),
                // A file that cannot be read at all (a .json that is not JSON) is one bad
                // row under on_bad_row = "skip"; the next file follows.
                Err(e) => {
                    self.current = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_pads_to_the_longest_row() {
        let sample = |n: u32| Encoded {
            input_ids: (1..=n).collect(),
            labels: (1..=n as i64).collect(),
        };
        let packed = TrainRow::Packed(pack(&[sample(2), sample(3)], 5).remove(0));
        let short = TrainRow::Sample(sample(2));
        let (batch, labels) = collate(&[&short, &packed]);
        assert_eq!(batch.input_ids[0].len(), 5);
        assert_eq!(batch.attention_mask[0], [true, true, false, false, false]);
        assert_eq!(labels[0], [1, 2, -100, -100, -100]);
        assert_eq!(batch.position_ids[1], [0, 1, 2, 0, 1]);
        assert_eq!(batch.segment_ids[1], [0, 0, 0, 1, 1]);
        assert_eq!(labels[1], [-100, 2, 3, -100, 2]);
    }

    #[test]
    fn sampling_below_and_above_the_size() {
        let rows: Vec<usize> = (0..10).collect();
        let some = sample(rows.clone(), 4, 42);
        assert_eq!(some.len(), 4);
        let mut unique = some.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 4, "without replacement: {some:?}");
        assert_eq!(some, sample(rows.clone(), 4, 42), "seeded");
        let many = sample(rows.clone(), 23, 42);
        assert_eq!(many[..20], [rows.clone(), rows.clone()].concat()[..]);
        assert_eq!(many.len(), 23);
    }

    #[test]
    fn validation_split_is_seeded_and_keeps_file_order() {
        let rows: Vec<usize> = (0..100).collect();
        let (train, val) = split(rows.clone(), 0.05, 42);
        assert_eq!((train.len(), val.len()), (95, 5));
        assert!(train.windows(2).all(|w| w[0] < w[1]) && val.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(split(rows.clone(), 0.05, 42).1, val);
        assert_ne!(split(rows, 0.05, 43).1, val);
        // One row is never all validation.
        assert_eq!(split(vec![1], 0.5, 42), (vec![1], vec![]));
    }
}
