//! Hash strategies: how a key (or lock name) is mapped to one of N shards.
//!
//! Every strategy starts from the same **key hash**: the first 8 bytes of the MD5 digest of the
//! key's UTF-8 bytes, read as a big-endian `u64` ([`key_hash`]). In Python that is
//! `int(hashlib.md5(key.encode()).hexdigest()[:16], 16)`. Everything below is integer
//! arithmetic on that number (plus one IEEE-754 division in [`Jump`], which is exactly rounded
//! on every platform), so a key maps to the same shard in every process, on every platform and
//! in every release; known-answer tests pin this.
//!
//! | strategy | keys moved when a shard is added | weights | cost per key |
//! |---|---|---|---|
//! | [`Modulo`] | about n/(n+1) | yes (slots) | one MD5 |
//! | [`Ring`] | about 1/(n+1) | yes (virtual nodes) | one MD5 + binary search |
//! | [`Rendezvous`] | exactly those the new shard wins, about 1/(n+1) | no | one MD5 + n mixes |
//! | [`Jump`] | about 1/(n+1); shards can only be appended or removed from the end | no | one MD5 + O(ln n) |

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The default number of virtual nodes per unit of weight on a [`Ring`].
///
/// Chosen from the balance measured by the `shard_report` example: at this count the most
/// loaded of up to 16 equal shards holds at most about 10 % more keys than the mean.
pub const DEFAULT_VNODES: u32 = 1024;

/// The 16-byte MD5 digest of `bytes`.
pub fn md5(bytes: &[u8]) -> [u8; 16] {
    let digest = Md5::digest(bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(digest.as_slice());
    out
}

/// The key hash every strategy routes on: the first 8 bytes of `MD5(key)` as a big-endian
/// `u64`.
///
/// # Contract
/// Stable forever: changing it would move keys between shards. Equal to Python's
/// `int(hashlib.md5(key.encode()).hexdigest()[:16], 16)`.
pub fn key_hash(key: &str) -> u64 {
    let bytes = key.as_bytes();
    let d = if bytes.len() < 56 {
        md5_one_block(bytes)
    } else {
        md5(bytes)
    };
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// MD5 of a message shorter than 56 bytes, which pads to exactly one 64-byte block: the same
/// digest as [`md5`], without the streaming hasher's buffering.
fn md5_one_block(bytes: &[u8]) -> [u8; 16] {
    let n = bytes.len();
    let mut block = [0u8; 64];
    block[..n].copy_from_slice(bytes);
    block[n] = 0x80;
    block[56..].copy_from_slice(&((n as u64) * 8).to_le_bytes());
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    md5::block_api::compress(&mut state, &[block]);
    let mut out = [0u8; 16];
    for (chunk, v) in out.chunks_exact_mut(4).zip(state.iter()) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// One shard as a strategy sees it: a stable name and a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// The shard's name. Strategies that place shards by name ([`Ring`], [`Rendezvous`]) keep a
    /// key on the same shard as long as the shard keeps its name, whatever its position.
    pub name: String,
    /// The shard's relative share of the keys (at least 1).
    pub weight: u32,
}

impl ShardSpec {
    /// A shard of weight 1.
    pub fn new(name: impl Into<String>) -> Self {
        ShardSpec {
            name: name.into(),
            weight: 1,
        }
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// Maps a key to the index of the shard that owns it.
///
/// # Contract
/// - Pure and deterministic: the same key and the same shard list give the same index in every
///   process, platform and release.
/// - The result is always `< shard_count()`.
pub trait HashStrategy: Send + Sync + fmt::Debug {
    /// The strategy's name (`"modulo"`, `"ring"`, `"rendezvous"`, `"jump"`).
    fn name(&self) -> &'static str;

    /// How many shards the strategy distributes over.
    fn shard_count(&self) -> usize;

    /// The shard owning the key whose [`key_hash`] is `hash`.
    fn route_hash(&self, hash: u64) -> usize;

    /// The shard owning `key`.
    fn route(&self, key: &str) -> usize {
        self.route_hash(key_hash(key))
    }
}

/// The strategies coordkit knows, by name, with their parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// [`Modulo`].
    Modulo,
    /// [`Ring`].
    Ring,
    /// [`Rendezvous`].
    Rendezvous,
    /// [`Jump`].
    Jump,
}

impl StrategyKind {
    /// Every strategy, in the order reports list them.
    pub const ALL: [StrategyKind; 4] = [
        StrategyKind::Modulo,
        StrategyKind::Ring,
        StrategyKind::Rendezvous,
        StrategyKind::Jump,
    ];

    /// The lower-case name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::Modulo => "modulo",
            StrategyKind::Ring => "ring",
            StrategyKind::Rendezvous => "rendezvous",
            StrategyKind::Jump => "jump",
        }
    }

    /// Whether the strategy honours shard weights other than 1.
    pub fn supports_weights(self) -> bool {
        matches!(self, StrategyKind::Modulo | StrategyKind::Ring)
    }

    /// Builds the strategy over `shards`. `vnodes` is the ring's virtual nodes per unit of
    /// weight (default [`DEFAULT_VNODES`]); other strategies ignore it.
    ///
    /// # Errors
    /// `InvalidConfig` for no shards, a duplicate or empty name, a zero weight, a weight other
    /// than 1 for a strategy without weights, zero vnodes, or more ring points than fit in memory
    /// sensibly (over 2^24).
    pub fn build(self, shards: &[ShardSpec], vnodes: Option<u32>) -> Result<Arc<dyn HashStrategy>> {
        check_shards(shards)?;
        if !self.supports_weights() {
            if let Some(s) = shards.iter().find(|s| s.weight != 1) {
                return Err(Error::config(format!(
                    "shard {:?} has weight {}, but the {} strategy does not support weights \
                     (use ring or modulo)",
                    s.name,
                    s.weight,
                    self.as_str()
                )));
            }
        }
        Ok(match self {
            StrategyKind::Modulo => Arc::new(Modulo::new(shards)?),
            StrategyKind::Ring => Arc::new(Ring::new(shards, vnodes.unwrap_or(DEFAULT_VNODES))?),
            StrategyKind::Rendezvous => Arc::new(Rendezvous::new(shards)?),
            StrategyKind::Jump => Arc::new(Jump::new(shards.len())?),
        })
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StrategyKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        StrategyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown sharding strategy {s:?}; known: modulo, ring, rendezvous, jump"
                ))
            })
    }
}

fn check_shards(shards: &[ShardSpec]) -> Result<()> {
    if shards.is_empty() {
        return Err(Error::config("a sharded store needs at least one shard"));
    }
    let mut seen = std::collections::HashSet::new();
    for s in shards {
        if s.name.is_empty() {
            return Err(Error::config("a shard name must not be empty"));
        }
        if s.weight == 0 {
            return Err(Error::config(format!(
                "shard {:?} has weight 0; weights must be at least 1",
                s.name
            )));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(Error::config(format!("duplicate shard {:?}", s.name)));
        }
    }
    Ok(())
}

/// `h(x) = x mod n`, with `x` the [`key_hash`]: the classic scheme, done correctly.
///
/// The key hash is the first 8 bytes of MD5 read as a big-endian `u64` (the classic sample
/// `int(md5(key).hexdigest()[:10]) % n` fails on any digest with a hex letter among its first
/// ten digits, because it parses hex as decimal). With weights, the `W` = sum of weights slots
/// `0..W` are dealt to the shards in order, `weight` consecutive slots each, and the key goes to
/// slot `x mod W`; with every weight 1 that is exactly `x mod n`.
///
/// Adding a shard moves about n/(n+1) of all keys; use it only for a fixed shard count or for
/// compatibility with data already laid out this way.
#[derive(Debug, Clone)]
pub struct Modulo {
    /// `slot_owner[s]`: the shard owning slot `s`.
    slot_owner: Vec<usize>,
    shards: usize,
}

impl Modulo {
    /// Modulo over `shards` (weights give slots).
    ///
    /// # Errors
    /// `InvalidConfig` as [`StrategyKind::build`], and for a total weight over 2^20.
    pub fn new(shards: &[ShardSpec]) -> Result<Self> {
        check_shards(shards)?;
        let total: u64 = shards.iter().map(|s| u64::from(s.weight)).sum();
        if total > 1 << 20 {
            return Err(Error::config(format!(
                "total shard weight {total} is too large (at most 1048576)"
            )));
        }
        let mut slot_owner = Vec::with_capacity(total as usize);
        for (i, s) in shards.iter().enumerate() {
            slot_owner.extend(std::iter::repeat_n(i, s.weight as usize));
        }
        Ok(Modulo {
            slot_owner,
            shards: shards.len(),
        })
    }

    /// Modulo over `n` shards of weight 1: `key_hash % n`.
    ///
    /// # Errors
    /// `InvalidConfig` if `n` is 0.
    pub fn with_count(n: usize) -> Result<Self> {
        let shards: Vec<ShardSpec> = (0..n).map(|i| ShardSpec::new(i.to_string())).collect();
        Self::new(&shards)
    }
}

impl HashStrategy for Modulo {
    fn name(&self) -> &'static str {
        "modulo"
    }

    fn shard_count(&self) -> usize {
        self.shards
    }

    fn route_hash(&self, hash: u64) -> usize {
        // `slot_owner` is never empty (checked in `new`).
        let slot = hash % self.slot_owner.len() as u64;
        self.slot_owner[slot as usize]
    }
}

/// A Ketama-style consistent-hash ring over MD5.
///
/// Each shard gets `vnodes × weight` points on a ring of `u64`s. Points come from
/// `MD5("<shard name>-<i>")` for `i = 0, 1, 2, …`, each digest giving two points (bytes 0–7
/// and 8–15, big-endian), as Ketama takes four 32-bit points from each digest. A key belongs to
/// the first point at or after its [`key_hash`], wrapping around; when two points coincide, the
/// shard listed first wins. Because points depend only on shard names, adding a shard moves
/// only the keys it takes over (about 1/(n+1)), and reordering the list moves nothing.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<u64>,
    owners: Vec<u32>,
    /// `index[b]`: the first point whose top `index_bits` bits are `>= b`, so a lookup only
    /// searches the few points of its bucket.
    index: Vec<u32>,
    index_bits: u32,
    shards: usize,
    vnodes: u32,
}

impl Ring {
    /// A ring over `shards` with `vnodes` virtual nodes per unit of weight.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad shard list, `vnodes == 0`, or more than 2^24 points in all.
    pub fn new(shards: &[ShardSpec], vnodes: u32) -> Result<Self> {
        check_shards(shards)?;
        if vnodes == 0 {
            return Err(Error::config(
                "a ring needs at least 1 virtual node per shard",
            ));
        }
        let total: u64 = shards
            .iter()
            .map(|s| u64::from(s.weight) * u64::from(vnodes))
            .sum();
        if total > 1 << 24 {
            return Err(Error::config(format!(
                "{total} ring points (vnodes × weights) is too many; at most 16777216"
            )));
        }
        let mut pts: Vec<(u64, u32)> = Vec::with_capacity(total as usize);
        for (idx, s) in shards.iter().enumerate() {
            let count = u64::from(s.weight) * u64::from(vnodes);
            let mut i = 0u64;
            let mut made = 0u64;
            while made < count {
                let d = md5(format!("{}-{i}", s.name).as_bytes());
                for half in [&d[0..8], &d[8..16]] {
                    if made < count {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(half);
                        pts.push((u64::from_be_bytes(b), idx as u32));
                        made += 1;
                    }
                }
                i += 1;
            }
        }
        // Sort by point, then by shard position, and keep the first of equal points.
        pts.sort_unstable();
        pts.dedup_by_key(|p| p.0);
        let points: Vec<u64> = pts.iter().map(|p| p.0).collect();
        // About one bucket per point, between 2^4 and 2^16 buckets.
        let index_bits = (points.len().max(2) as u64)
            .next_power_of_two()
            .trailing_zeros()
            .clamp(4, 16);
        let buckets = 1usize << index_bits;
        let mut index = Vec::with_capacity(buckets + 1);
        for b in 0..buckets as u64 {
            let start = b << (64 - index_bits);
            index.push(points.partition_point(|&p| p < start) as u32);
        }
        index.push(points.len() as u32);
        Ok(Ring {
            owners: pts.iter().map(|p| p.1).collect(),
            points,
            index,
            index_bits,
            shards: shards.len(),
            vnodes,
        })
    }

    /// The virtual nodes per unit of weight.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// The number of points on the ring.
    pub fn point_count(&self) -> usize {
        self.points.len()
    }
}

impl HashStrategy for Ring {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn shard_count(&self) -> usize {
        self.shards
    }

    fn route_hash(&self, hash: u64) -> usize {
        // The first point >= hash, wrapping to the first point of the ring.
        let b = (hash >> (64 - self.index_bits)) as usize;
        let (lo, hi) = match (self.index.get(b), self.index.get(b + 1)) {
            (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
            _ => (0, self.points.len()),
        };
        let i = lo
            + self
                .points
                .get(lo..hi)
                .map_or(0, |bucket| bucket.partition_point(|&p| p < hash));
        let i = if i >= self.points.len() { 0 } else { i };
        self.owners.get(i).map_or(0, |&o| o as usize)
    }
}

/// The SplitMix64 finaliser: a fixed bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous (highest-random-weight) hashing.
///
/// Each shard has a seed, the [`key_hash`] of its name. A key's score on a shard is
/// [`mix64`]`(key_hash ^ seed)`; the key belongs to the shard with the highest score (the one
/// listed first on a tie). Adding a shard moves exactly the keys the new shard wins; removing
/// one moves only its own keys. Cost is linear in the number of shards. Weights are not
/// supported.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    seeds: Vec<u64>,
}

impl Rendezvous {
    /// Rendezvous hashing over `shards` (weights must be 1).
    ///
    /// # Errors
    /// `InvalidConfig` for a bad shard list or a weight other than 1.
    pub fn new(shards: &[ShardSpec]) -> Result<Self> {
        check_shards(shards)?;
        if let Some(s) = shards.iter().find(|s| s.weight != 1) {
            return Err(Error::config(format!(
                "shard {:?}: rendezvous hashing does not support weights",
                s.name
            )));
        }
        Ok(Rendezvous {
            seeds: shards.iter().map(|s| key_hash(&s.name)).collect(),
        })
    }
}

impl HashStrategy for Rendezvous {
    fn name(&self) -> &'static str {
        "rendezvous"
    }

    fn shard_count(&self) -> usize {
        self.seeds.len()
    }

    fn route_hash(&self, hash: u64) -> usize {
        let mut best = 0usize;
        let mut best_score = 0u64;
        for (i, &seed) in self.seeds.iter().enumerate() {
            let score = mix64(hash ^ seed);
            if i == 0 || score > best_score {
                best = i;
                best_score = score;
            }
        }
        best
    }
}

/// Jump consistent hashing (Lamping and Veach, 2014) on the [`key_hash`].
///
/// Shards are identified by position only: adding a shard at the end moves about 1/(n+1) of
/// the keys, all to the new shard, and removing the last shard moves only its keys; inserting
/// or removing a shard anywhere else remaps most keys. No weights, no memory, O(ln n) per key.
#[derive(Debug, Clone)]
pub struct Jump {
    shards: usize,
}

impl Jump {
    /// Jump hashing over `n` shards.
    ///
    /// # Errors
    /// `InvalidConfig` if `n` is 0 or over 2^31.
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 || n > 1 << 31 {
            return Err(Error::config(format!(
                "jump hashing needs between 1 and 2^31 shards, not {n}"
            )));
        }
        Ok(Jump { shards: n })
    }
}

/// The jump consistent hash of `key` over `buckets` buckets (the published algorithm), for
/// `buckets` from 1 to 2^31 as [`Jump::new`] allows.
///
/// The result is the published loop's, bit for bit; the steps are arranged so that the loop's
/// exit is decided before the float-to-integer conversion. Each candidate bucket
/// `(b + 1) * (2^31 / ((key >> 33) + 1))` is compared with `buckets` as a float (for a
/// non-negative number and a whole one, truncating first does not change the comparison) and
/// truncated only when it is below `buckets`.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let n = buckets as i64 as f64;
    // The bucket most recently jumped to; 0 is always below `buckets` (at least 1).
    let mut b: i64 = 0;
    loop {
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        let next = ((b + 1) as f64) * ((1i64 << 31) as f64 / ((key >> 33) as i64 + 1) as f64);
        if next >= n {
            return b as usize;
        }
        // `next` is finite and in [1, buckets), so the conversion is exact truncation.
        b = next as i64;
    }
}

impl HashStrategy for Jump {
    fn name(&self) -> &'static str {
        "jump"
    }

    fn shard_count(&self) -> usize {
        self.shards
    }

    fn route_hash(&self, hash: u64) -> usize {
        jump_hash(hash, self.shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<ShardSpec> {
        (0..n)
            .map(|i| ShardSpec::new(format!("shard-{i}")))
            .collect()
    }

    #[test]
    fn key_hash_is_md5_prefix_big_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(key_hash(""), 0xd41d_8cd9_8f00_b204);
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(key_hash("a"), 0x0cc1_75b9_c0f1_b6a8);
    }

    #[test]
    fn one_block_md5_matches_the_streaming_hasher() {
        for len in 0..80 {
            let key: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let d = md5(key.as_bytes());
            let want = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            assert_eq!(key_hash(&key), want, "length {len}");
        }
    }

    /// The loop exactly as Lamping and Veach published it.
    fn published_jump(mut key: u64, buckets: usize) -> usize {
        let mut b: i64 = -1;
        let mut j: i64 = 0;
        while j < buckets as i64 {
            b = j;
            key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
            j = (((b + 1) as f64) * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
        }
        b.max(0) as usize
    }

    #[test]
    fn jump_hash_agrees_with_the_published_loop() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut hashes: Vec<u64> = (0..2_000)
            .map(|_| {
                // xorshift64: spread hashes, repeatable.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect();
        hashes.extend([0, 1, u64::MAX, 1 << 33, (1 << 33) - 1]);
        let counts = (1..=300).chain([1000, 4096, 65_536, 1 << 20, (1 << 31) - 1, 1 << 31]);
        for n in counts {
            for &h in &hashes {
                assert_eq!(
                    jump_hash(h, n),
                    published_jump(h, n),
                    "hash {h:#x}, {n} buckets"
                );
            }
        }
    }

    #[test]
    fn every_route_is_in_range() {
        for kind in StrategyKind::ALL {
            for n in 1..=9 {
                let s = kind.build(&names(n), Some(16)).unwrap();
                for i in 0..2000 {
                    assert!(s.route(&format!("k{i}")) < n, "{kind} n={n}");
                }
            }
        }
    }

    #[test]
    fn bad_shard_lists_are_invalid_config() {
        use crate::ErrorKind;
        let dup = [ShardSpec::new("a"), ShardSpec::new("a")];
        let zero = [ShardSpec::new("a").weight(0)];
        let heavy = vec![ShardSpec::new("a").weight(2)];
        for kind in StrategyKind::ALL {
            for bad in [&[][..], &dup[..], &zero[..]] {
                let e = kind.build(bad, None).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{kind} {bad:?}");
            }
            assert_eq!(kind.build(&heavy, None).is_ok(), kind.supports_weights());
        }
        let e = StrategyKind::Ring.build(&names(2), Some(0)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        let e = "maglev".parse::<StrategyKind>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    }

    #[test]
    fn ring_weights_shift_load() {
        let shards = vec![ShardSpec::new("a").weight(3), ShardSpec::new("b")];
        let ring = Ring::new(&shards, 256).unwrap();
        let mut counts = [0usize; 2];
        for i in 0..40_000 {
            counts[ring.route(&format!("key-{i}"))] += 1;
        }
        let share = counts[0] as f64 / 40_000.0;
        assert!((0.70..0.80).contains(&share), "weight 3 of 4 got {share}");
    }

    #[test]
    fn ring_ignores_shard_order() {
        let a = names(5);
        let mut b = a.clone();
        b.reverse();
        let (ra, rb) = (Ring::new(&a, 64).unwrap(), Ring::new(&b, 64).unwrap());
        let (va, vb) = (Rendezvous::new(&a).unwrap(), Rendezvous::new(&b).unwrap());
        for i in 0..5000 {
            let k = format!("k/{i}");
            assert_eq!(a[ra.route(&k)].name, b[rb.route(&k)].name);
            assert_eq!(a[va.route(&k)].name, b[vb.route(&k)].name);
        }
    }

    #[test]
    fn consistent_strategies_only_move_to_the_new_shard() {
        for kind in [
            StrategyKind::Ring,
            StrategyKind::Rendezvous,
            StrategyKind::Jump,
        ] {
            let old = kind.build(&names(4), Some(64)).unwrap();
            let new = kind.build(&names(5), Some(64)).unwrap();
            for i in 0..20_000 {
                let k = format!("key-{i}");
                let (o, n) = (old.route(&k), new.route(&k));
                assert!(o == n || n == 4, "{kind}: {k} moved {o} -> {n}");
            }
        }
    }
}
