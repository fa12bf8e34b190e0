//! Generated operation sequences against a reference model: appends, commits, syncs, clean
//! reopens, power losses (with and without torn sectors) and releases. After every step the log
//! must hold exactly the model's records: everything acknowledged as durable and not released
//! reads back byte-identical, in LSN order, and nothing else (no partial or stale record) ever
//! surfaces.

use std::sync::Arc;

use herald_wal::{Durability, Lsn, MemStorage, Options, Wal};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append and wait as the durability mode says.
    Commit {
        kind: u8,
        len: usize,
        fill: u8,
    },
    /// Append without waiting for durability.
    Append {
        kind: u8,
        len: usize,
        fill: u8,
    },
    Sync,
    /// Drop the log (which syncs) and open it again.
    Reopen,
    /// Lose power now: reopen from what the disk holds, keeping a random subset of unsynced
    /// sectors when `torn` is set.
    PowerLoss {
        torn: Option<u64>,
    },
    /// Release segments before the LSN this far back from the end (0 = everything possible).
    Release {
        back: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Lengths up to 1.5 KiB in 4 KiB segments: many roll-overs, some near-full segments.
    let record = (1u8..=255, 0usize..1536, any::<u8>());
    prop_oneof![
        8 => record.clone().prop_map(|(kind, len, fill)| Op::Commit { kind, len, fill }),
        4 => record.prop_map(|(kind, len, fill)| Op::Append { kind, len, fill }),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        2 => proptest::option::of(any::<u64>()).prop_map(|torn| Op::PowerLoss { torn }),
        1 => (0u8..40).prop_map(|back| Op::Release { back }),
    ]
}

/// A payload that differs by length, fill and position, so misplaced bytes are caught.
fn payload(len: usize, fill: u8) -> Vec<u8> {
    (0..len).map(|i| fill.wrapping_add(i as u8)).collect()
}

struct Model {
    /// Every record appended and not known lost, in LSN order: (lsn, kind, payload).
    records: Vec<(Lsn, u8, Vec<u8>)>,
    /// Records up to here must survive any crash.
    durable: Lsn,
    /// Records below here may have been released.
    released_before: Lsn,
}

struct Harness {
    storage: MemStorage,
    wal: Option<Wal>,
    options: Options,
    model: Model,
}

impl Harness {
    fn new(durability: Durability) -> Harness {
        let options = Options {
            segment_bytes: 4096,
            durability,
            ..Options::default()
        };
        let storage = MemStorage::new();
        let wal = Wal::open_storage(Arc::new(storage.clone()), options.clone()).unwrap();
        Harness {
            storage,
            wal: Some(wal),
            options,
            model: Model {
                records: Vec::new(),
                durable: Lsn(0),
                released_before: Lsn(0),
            },
        }
    }

    fn wal(&self) -> &Wal {
        self.wal.as_ref().expect("open")
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Commit { kind, len, fill } | Op::Append { kind, len, fill } => {
                let bytes = payload(len, fill);
                let appended = if matches!(op, Op::Commit { .. }) {
                    self.wal().commit(kind, &bytes).unwrap()
                } else {
                    self.wal().append(kind, &bytes).unwrap()
                };
                let expected = self.model.records.last().map_or(Lsn(1), |r| r.0.next());
                let expected = expected.max(self.model.released_before);
                prop_assert!(appended.lsn >= expected);
                if matches!(op, Op::Commit { .. }) && self.options.durability == Durability::Sync {
                    prop_assert!(self.wal().durable_lsn() >= appended.lsn);
                    self.model.durable = appended.lsn;
                }
                let record = self.wal().read(appended.position).unwrap();
                prop_assert_eq!(record.lsn, appended.lsn);
                prop_assert_eq!(&*record.payload, &bytes[..]);
                self.model.records.push((appended.lsn, kind, bytes));
            }
            Op::Sync => {
                let durable = self.wal().sync().unwrap();
                self.model.durable = durable;
                prop_assert_eq!(
                    Some(durable),
                    self.model.records.last().map(|r| r.0).or(Some(durable))
                );
            }
            Op::Reopen => {
                drop(self.wal.take());
                // A clean close syncs everything.
                if let Some(last) = self.model.records.last() {
                    self.model.durable = last.0;
                }
                self.reopen(self.storage.clone())?;
            }
            Op::PowerLoss { torn } => {
                let image = self.storage.crash_image(torn);
                // The old handle's drop-time sync only touches the old storage.
                drop(self.wal.take());
                self.storage = image.clone();
                self.reopen(image)?;
            }
            Op::Release { back } => {
                let next = self.wal().next_lsn();
                let before = Lsn(next.0.saturating_sub(back as u64));
                self.wal().release_before(before).unwrap();
                let first = self.wal().first_lsn();
                prop_assert!(first <= before.max(first));
                self.model.released_before = self.model.released_before.max(first);
            }
        }
        self.check()
    }

    /// Reopens and reconciles the model with what survived: a prefix of the model's records
    /// that includes everything durable.
    fn reopen(&mut self, storage: MemStorage) -> Result<(), TestCaseError> {
        let wal = Wal::open_storage(Arc::new(storage), self.options.clone()).unwrap();
        let next = wal.next_lsn();
        prop_assert!(
            next.0 > self.model.durable.0,
            "durable record {} lost (log resumes at {next})",
            self.model.durable
        );
        self.model.records.retain(|r| r.0 < next);
        let first = wal.first_lsn();
        self.model.released_before = self.model.released_before.max(first);
        self.wal = Some(wal);
        Ok(())
    }

    /// The log holds exactly the model's unreleased records, in order.
    fn check(&self) -> Result<(), TestCaseError> {
        let wal = self.wal();
        let first = wal.first_lsn();
        prop_assert!(first <= self.model.released_before.max(first));
        let live: Vec<_> = self.model.records.iter().filter(|r| r.0 >= first).collect();
        let found: Vec<_> = wal
            .records_from(first)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        prop_assert_eq!(
            found.len(),
            live.len(),
            "record count differs from the model"
        );
        for (record, expected) in found.iter().zip(live) {
            prop_assert_eq!(record.lsn, expected.0);
            prop_assert_eq!(record.kind, expected.1);
            prop_assert_eq!(&*record.payload, &expected.2[..]);
        }
        let next = self.model.records.last().map_or(first, |r| r.0.next());
        prop_assert!(wal.next_lsn() >= next);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model_under_sync(ops in proptest::collection::vec(op(), 1..60)) {
        let mut harness = Harness::new(Durability::Sync);
        for op in &ops {
            harness.apply(op)?;
        }
    }

    #[test]
    fn log_matches_model_under_no_sync(ops in proptest::collection::vec(op(), 1..60)) {
        let mut harness = Harness::new(Durability::None);
        for op in &ops {
            harness.apply(op)?;
        }
    }
}
