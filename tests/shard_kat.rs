//! Known-answer tests: the key-to-shard mapping of every strategy is pinned, so it cannot change
//! between releases, platforms or processes without a test failing. The expected values come
//! from an independent implementation in Python (`python3 scripts/shard_kat.py`).

use coordkit::shard::strategy::{md5, Jump, Modulo, Rendezvous, Ring, ShardSpec};
use coordkit::shard::{key_hash, HashStrategy, StrategyKind, DEFAULT_VNODES};

fn names() -> Vec<ShardSpec> {
    (0..5)
        .map(|i| ShardSpec::new(format!("shard-{i}")))
        .collect()
}

/// key, key_hash, modulo(5), ring(5 shards, 16 vnodes), ring(5, 1024), rendezvous(5), jump(7)
fn table() -> Vec<(String, u64, usize, usize, usize, usize, usize)> {
    let k100 = "k".repeat(100);
    vec![
        ("".into(), 0xd41d8cd98f00b204, 3, 0, 2, 1, 3),
        ("a".into(), 0x0cc175b9c0f1b6a8, 0, 1, 1, 0, 4),
        ("users/42".into(), 0x842d5487525952fb, 0, 4, 0, 4, 6),
        (
            "config/v2/db.primary".into(),
            0xef77ac08b9d30358,
            0,
            3,
            3,
            4,
            5,
        ),
        (
            "jobs/nightly-report".into(),
            0xc094db086dd221b2,
            2,
            2,
            2,
            3,
            4,
        ),
        (k100, 0x1c3658dd5da9a0f5, 3, 2, 4, 0, 1),
        ("ct-1/x".into(), 0xbb0b22eef50297bb, 0, 0, 1, 0, 2),
        ("shard-key-7".into(), 0x20597facaf7fd84a, 2, 2, 4, 4, 4),
        ("Z".into(), 0x21c2e59531c87101, 3, 2, 4, 2, 3),
        ("a/b/c/d/e/f".into(), 0xdd37f5b5386ba293, 4, 4, 4, 1, 1),
    ]
}

#[test]
fn pinned_answers() {
    assert_eq!(
        DEFAULT_VNODES, 1024,
        "the default vnode count is part of the mapping"
    );
    let modulo = Modulo::with_count(5).unwrap();
    let ring16 = Ring::new(&names(), 16).unwrap();
    let ring = StrategyKind::Ring.build(&names(), None).unwrap();
    let rendezvous = Rendezvous::new(&names()).unwrap();
    let jump = Jump::new(7).unwrap();
    for (key, hash, m, r16, r, hrw, j) in table() {
        assert_eq!(key_hash(&key), hash, "key_hash({key:?})");
        assert_eq!(modulo.route(&key), m, "modulo({key:?})");
        assert_eq!(ring16.route(&key), r16, "ring16({key:?})");
        assert_eq!(ring.route(&key), r, "ring({key:?})");
        assert_eq!(rendezvous.route(&key), hrw, "rendezvous({key:?})");
        assert_eq!(jump.route(&key), j, "jump({key:?})");
    }
}

#[test]
fn pinned_owners_digest() {
    let modulo = Modulo::with_count(5).unwrap();
    let ring16 = Ring::new(&names(), 16).unwrap();
    let rendezvous = Rendezvous::new(&names()).unwrap();
    let jump = Jump::new(7).unwrap();
    let mut bytes = Vec::with_capacity(80_000);
    for i in 0..20_000 {
        let k = format!("key-{i}");
        for s in [&modulo as &dyn HashStrategy, &ring16, &rendezvous, &jump] {
            bytes.push(s.route(&k) as u8);
        }
    }
    let hex: String = md5(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "485eae70d69ace9d80f5570c6553b226");
}
