//! The ring-buffer reader: raw records from a [`RecordSource`] (the BPF ring buffer, or
//! a recording) into bounded batches of [`Event`]s for the pipeline. Batching,
//! backpressure and the payload arena live here, away from BPF, so they are tested
//! without root.

use std::{collections::VecDeque, ops::Deref};

use tokio::sync::mpsc;

use super::{Clock, Event, decode_into};
use crate::telemetry::{Queue, QueueLabel, Telemetry};

/// Where raw ring-buffer records come from.
pub trait RecordSource {
    type Record<'a>: Deref<Target = [u8]>
    where
        Self: 'a;

    /// The next record waiting, if any.
    fn next_record(&mut self) -> Option<Self::Record<'_>>;
}

impl RecordSource for aya::maps::RingBuf<aya::maps::MapData> {
    type Record<'a> = aya::maps::ring_buf::RingBufItem<'a>;

    fn next_record(&mut self) -> Option<Self::Record<'_>> {
        self.next()
    }
}

/// Records held in memory, oldest first: a recording being replayed, or a test's.
#[derive(Debug, Default)]
pub struct RecordedRecords {
    records: VecDeque<Vec<u8>>,
    /// The record handed out last (kept until the next call).
    current: Vec<u8>,
}

impl RecordedRecords {
    pub fn new(records: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Self {
            records: records.into_iter().collect(),
            current: Vec::new(),
        }
    }

    /// Records not read yet.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl RecordSource for RecordedRecords {
    type Record<'a> = &'a [u8];

    fn next_record(&mut self) -> Option<&[u8]> {
        self.current = self.records.pop_front()?;
        Some(&self.current)
    }
}

/// Events per batch handed to the pipeline.
pub const BATCH: usize = 1024;
/// Events waiting for the pipeline at most. When the pipeline is this far behind,
/// reading stops and events wait in the ring buffer, whose fixed size is then the
/// only buffer (what does not fit is counted by the kernel as lost): memory stays
/// bounded by the ring, not by how far behind we are.
pub const MAX_QUEUED_EVENTS: usize = 16384;
/// Bytes the payload arena grows by at a time.
const ARENA_BLOCK: usize = 256 << 10;

/// Reads what waits in `source` into batches, as far as the pipeline keeps up.
pub fn drain(
    source: &mut impl RecordSource,
    clock: &Clock,
    tx: &mpsc::Sender<Vec<Event>>,
    telemetry: &Telemetry,
    seen: &mut impl FnMut(&Event),
) {
    let mut batch = Vec::new();
    // Payloads are copied into one shared arena, refilled in large blocks.
    let mut arena = bytes::BytesMut::new();
    loop {
        if telemetry.events_backlog.len() + batch.len() >= MAX_QUEUED_EVENTS {
            // The pipeline is behind: leave the rest in the ring buffer.
            break;
        }
        let Some(item) = source.next_record() else {
            break;
        };
        if arena.capacity() < item.len() {
            arena.reserve(ARENA_BLOCK.max(item.len()));
        }
        match decode_into(&item, clock, &mut arena) {
            Ok(ev) => {
                seen(&ev);
                batch.push(ev);
            }
            Err(e) => {
                log::debug!("undecodable ring buffer record: {e}");
                telemetry.decode_errors.inc();
            }
        }
        if batch.len() >= BATCH {
            send(tx, std::mem::take(&mut batch), telemetry);
        }
    }
    if !batch.is_empty() {
        send(tx, batch, telemetry);
    }
}

/// Everything left in `source`, at shutdown (no batching, no backpressure: the
/// caller waits for the pipeline to take it). Undecodable records are counted.
pub fn take_all(
    source: &mut impl RecordSource,
    clock: &Clock,
    telemetry: &Telemetry,
) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(item) = source.next_record() {
        match super::decode(&item, clock) {
            Ok(ev) => events.push(ev),
            Err(e) => {
                log::debug!("undecodable ring buffer record: {e}");
                telemetry.decode_errors.inc();
            }
        }
    }
    telemetry.events_read.inc_by(events.len() as u64);
    events
}

/// Hands a batch to the pipeline, or drops it, counted, when the queue is full.
fn send(tx: &mpsc::Sender<Vec<Event>>, batch: Vec<Event>, telemetry: &Telemetry) {
    let n = batch.len() as u64;
    telemetry.events_read.inc_by(n);
    let room = telemetry
        .events_backlog
        .try_add(batch.len(), MAX_QUEUED_EVENTS);
    if !room || tx.try_send(batch).is_err() {
        if room {
            telemetry.events_backlog.take(n as usize);
        }
        telemetry
            .queue_dropped
            .get_or_create(&QueueLabel::new(Queue::Events))
            .inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{
        data::{DataHeader, Direction},
        event::{EventHeader, EventKind},
    };

    use super::*;

    /// A raw Data record: header, then `payload`.
    fn data_record(ts: u64, payload: &[u8]) -> Vec<u8> {
        let d = DataHeader {
            header: EventHeader {
                kind: EventKind::Data as u32,
                cpu: 0,
                ts_ns: ts,
                tgid: 42,
                tid: 43,
                sock: 0xffff_0001,
                comm: [0; 16],
            },
            direction: Direction::Send as u32,
            syscall: 44,
            total_len: payload.len() as u32,
            captured_len: payload.len() as u32,
            flags: 0,
            _pad: 0,
        };
        // SAFETY: the bytes of a plain #[repr(C)] value.
        let mut bytes = unsafe {
            std::slice::from_raw_parts(
                (&d as *const DataHeader).cast::<u8>(),
                size_of::<DataHeader>(),
            )
        }
        .to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    fn payloads(events: &[Event]) -> Vec<Vec<u8>> {
        events
            .iter()
            .map(|e| match e {
                Event::Data(d) => d.payload.to_vec(),
                other => panic!("not data: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn records_become_batches_of_at_most_batch_events_in_order() {
        let n = BATCH * 2 + 10;
        let mut source =
            RecordedRecords::new((0..n).map(|i| data_record(i as u64, format!("{i}").as_bytes())));
        let (tx, mut rx) = mpsc::channel(16);
        let telemetry = Telemetry::new();
        drain(
            &mut source,
            &Clock::with_offset(0),
            &tx,
            &telemetry,
            &mut |_| {},
        );
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            sizes.push(batch.len());
            all.extend(payloads(&batch));
        }
        assert_eq!(sizes, [BATCH, BATCH, 10]);
        let want: Vec<Vec<u8>> = (0..n).map(|i| format!("{i}").into_bytes()).collect();
        assert_eq!(all, want, "every payload, in order, from the shared arena");
        assert_eq!(telemetry.events_backlog.len(), n);
        assert!(source.is_empty());
    }

    #[test]
    fn a_pipeline_that_far_behind_leaves_records_in_the_source() {
        let telemetry = Telemetry::new();
        assert!(
            telemetry
                .events_backlog
                .try_add(MAX_QUEUED_EVENTS - 5, MAX_QUEUED_EVENTS)
        );
        let mut source = RecordedRecords::new((0..100).map(|i| data_record(i, b"x")));
        let (tx, mut rx) = mpsc::channel(16);
        drain(
            &mut source,
            &Clock::with_offset(0),
            &tx,
            &telemetry,
            &mut |_| {},
        );
        let batch = rx.try_recv().expect("one batch");
        assert_eq!(batch.len(), 5, "only up to the backlog limit");
        assert_eq!(source.len(), 95, "the rest waits where it was");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_full_channel_drops_the_batch_counted_and_frees_its_room() {
        let telemetry = Telemetry::new();
        let (tx, _rx) = mpsc::channel(1);
        tx.try_send(Vec::new()).unwrap(); // the channel is full
        let mut source = RecordedRecords::new((0..3).map(|i| data_record(i, b"y")));
        drain(
            &mut source,
            &Clock::with_offset(0),
            &tx,
            &telemetry,
            &mut |_| {},
        );
        assert_eq!(telemetry.events_backlog.len(), 0);
        let text = telemetry.render();
        assert!(
            text.contains("tracer_queue_dropped_total{queue=\"events\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn at_shutdown_everything_left_is_taken_and_bad_records_counted() {
        let telemetry = Telemetry::new();
        let mut source = RecordedRecords::new(
            (0..(MAX_QUEUED_EVENTS as u64 + 3))
                .map(|i| data_record(i, b"z"))
                .chain([vec![9, 9]]),
        );
        let events = take_all(&mut source, &Clock::with_offset(0), &telemetry);
        assert_eq!(events.len(), MAX_QUEUED_EVENTS + 3, "no backpressure limit");
        assert!(source.is_empty());
        assert_eq!(telemetry.decode_errors.get(), 1);
        assert_eq!(telemetry.events_read.get(), events.len() as u64);
    }

    #[test]
    fn undecodable_records_are_counted_and_skipped() {
        let telemetry = Telemetry::new();
        let mut source =
            RecordedRecords::new([vec![1, 2, 3], data_record(1, b"ok"), vec![0xff; 64]]);
        let (tx, mut rx) = mpsc::channel(4);
        drain(
            &mut source,
            &Clock::with_offset(0),
            &tx,
            &telemetry,
            &mut |_| {},
        );
        let batch = rx.try_recv().unwrap();
        assert_eq!(payloads(&batch), [b"ok".to_vec()]);
        assert_eq!(telemetry.decode_errors.get(), 2);
    }
}
