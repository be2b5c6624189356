//! The rows of each optimizer step, from a dataset read whole or from a stream, and the position
//! a checkpoint records so that a resumed run reads on from the same row.

use std::iter::Peekable;

use super::checkpoint::DataPosition;
use crate::config::DataSection;
use crate::data::dataset::{Dataset, Stream, TrainRow};
use crate::data::encode::Encoder;
use crate::data::DataError;

/// Where the rows come from.
pub enum Source<'a> {
    Memory(&'a Dataset),
    /// `data.streaming`: each epoch is a new pass over the files.
    Stream {
        data: &'a DataSection,
        encoder: &'a Encoder,
        seed: u64,
    },
}

/// The source and its current epoch.
enum Rows<'a> {
    Memory {
        dataset: &'a Dataset,
        /// Indices into the dataset's rows, in this epoch's order.
        order: Vec<usize>,
    },
    Stream {
        data: &'a DataSection,
        encoder: &'a Encoder,
        seed: u64,
        /// Peekable: whether an epoch has ended is known only by reading on.
        stream: Box<Peekable<Stream<'a>>>,
    },
}

pub struct Feed<'a> {
    rows: Rows<'a>,
    position: DataPosition,
}

impl<'a> Feed<'a> {
    /// Opens the epoch of `position` and skips the rows earlier steps took.
    pub fn new(source: Source<'a>, position: DataPosition) -> Result<Self, DataError> {
        let rows = match source {
            Source::Memory(dataset) => Rows::Memory {
                dataset,
                order: dataset.epoch_order(position.epoch),
            },
            Source::Stream {
                data,
                encoder,
                seed,
            } => Rows::Stream {
                data,
                encoder,
                seed,
                stream: Box::new(Stream::new(data, seed, position.epoch, encoder)?.peekable()),
            },
        };
        let mut feed = Self {
            rows,
            position: DataPosition {
                epoch: position.epoch,
                rows: 0,
            },
        };
        let mut skipped = 0;
        while skipped < position.rows {
            let n = feed.take(position.rows - skipped)?.len();
            if n == 0 {
                break;
            }
            skipped += n;
        }
        Ok(feed)
    }

    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Epochs done, with the fraction of the current one (whole passes for a stream, whose
    /// length is not known).
    pub fn epoch_progress(&self) -> f64 {
        match &self.rows {
            Rows::Memory { order, .. } if !order.is_empty() => {
                self.position.epoch as f64 + self.position.rows as f64 / order.len() as f64
            }
            _ => self.position.epoch as f64,
        }
    }

    /// Whole epochs done: the current one counts once no row of it is left.
    pub fn epochs_done(&mut self) -> u64 {
        let ended = match &mut self.rows {
            Rows::Memory { order, .. } => self.position.rows >= order.len(),
            // An error is left for the next step to meet.
            Rows::Stream { stream, .. } => stream.peek().is_none(),
        };
        self.position.epoch + ended as u64
    }

    /// The micro-batches of the next optimizer step: up to `grad_accum` batches of up to
    /// `batch_size` rows, all from one epoch, so the last step of an epoch may be shorter (as
    /// transformers' Trainer does).
    pub fn next_step(
        &mut self,
        batch_size: usize,
        grad_accum: usize,
    ) -> Result<Vec<Vec<TrainRow>>, DataError> {
        for _ in 0..2 {
            let mut batches = Vec::with_capacity(grad_accum);
            while batches.len() < grad_accum {
                let rows = self.take(batch_size)?;
                if rows.is_empty() {
                    break;
                }
                batches.push(rows);
            }
            if !batches.is_empty() {
                return Ok(batches);
            }
            // The epoch ended exactly at the previous step.
            self.next_epoch()?;
        }
        Err(DataError::NoRows {
            what: "data.train".into(),
            skipped: 0,
        })
    }

    fn next_epoch(&mut self) -> Result<(), DataError> {
        let epoch = self.position.epoch + 1;
        match &mut self.rows {
            Rows::Memory { dataset, order } => *order = dataset.epoch_order(epoch),
            Rows::Stream {
                data,
                encoder,
                seed,
                stream,
            } => **stream = Stream::new(data, *seed, epoch, encoder)?.peekable(),
        }
        self.position = DataPosition { epoch, rows: 0 };
        Ok(())
    }

    /// Up to `n` rows of the current epoch; fewer at its end.
    fn take(&mut self, n: usize) -> Result<Vec<TrainRow>, DataError> {
        let rows: Vec<TrainRow> = match &mut self.rows {
            Rows::Memory { dataset, order } => {
                let start = self.position.rows.min(order.len());
                let end = (start + n).min(order.len());
                order[start..end]
                    .iter()
                    .map(|&i| dataset.train[i].clone())
                    .collect()
            }
            Rows::Stream { stream, .. } => stream.by_ref().take(n).collect::<Result<_, _>>()?,
        };
        self.position.rows += rows.len();
        Ok(rows)
    }
}
