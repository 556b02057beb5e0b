//! The simulator proper: blocks, pools and segments of one device.
//!
//! Data layout mirrors c10/cuda/CUDACachingAllocator.cpp: every `Block` lives in an arena
//! and links to its neighbours in the same segment (`prev`/`next`); free mapped blocks sit in
//! a per-pool ordered set ([`SizeSet`]) in `(stream, size, address)` order exactly as
//! `BlockComparatorSize` orders them, and unmapped expandable ranges in a set keyed
//! `(stream, address)` (`BlockComparatorAddress`). The size-ordered set is segregated: per
//! stream, blocks fall into power-of-two size classes, each a short sorted vector, with a
//! bitmap of the non-empty classes, so that an insertion, a removal or a best-fit look-up
//! touches one or two short vectors (a replay's pools hold hundreds of blocks, a class
//! typically a few). Live allocations are found by id in a vector ([`LiveMap`]). No scan of
//! all blocks happens per event (only the OOM path and a few getters walk a pool).
//!
//! For a memory snapshot ([`crate::output::memory_viz::from_trace`]) the simulator also
//! exposes its simulated addresses: [`Simulator::block_of`] (a live allocation's block),
//! an opt-in log of segment events ([`Simulator::log_segments`], [`SegmentEvent`]: the
//! `segment_alloc`, `segment_free`, `segment_map` and `segment_unmap` trace entries PyTorch
//! records) and the segments with their blocks ([`Simulator::segment_infos`], what
//! `torch.cuda.memory._snapshot()` lists). The log is written only on the paths that reserve
//! or release device memory, never on a cache hit or a free, so `alloc` and `free` cost the
//! same with it off.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use super::conf::AllocConf;
use crate::units::Bytes;

/// Every size is rounded to a multiple of this (`kMinBlockSize`).
pub const MIN_BLOCK_SIZE: u64 = 512;
/// Largest request served by the small pool (`kSmallSize`, 1 MiB).
pub const SMALL_SIZE: u64 = 1 << 20;
/// Segment size of the small pool (`kSmallBuffer`, 2 MiB); also its expandable page size.
pub const SMALL_BUFFER: u64 = 2 << 20;
/// Requests below this get a [`LARGE_BUFFER`] segment (`kMinLargeAlloc`, 10 MiB).
pub const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// Segment for large requests below 10 MiB (`kLargeBuffer`, 20 MiB); also the page size of
/// large-pool expandable segments (`find_expandable_block`).
pub const LARGE_BUFFER: u64 = 20 << 20;
/// Larger segments are rounded to a multiple of this (`kRoundLarge`, 2 MiB).
pub const ROUND_LARGE: u64 = 2 << 20;
/// Requests above this are refused outright (64 PiB): no device has it, and the rounding
/// arithmetic stays far from overflow.
pub const MAX_REQUEST: u64 = 1 << 56;
/// Virtual size of one simulated expandable segment. PyTorch reserves 1 1/8 of the device's
/// total memory; this is larger than any device, so in the simulation one segment per stream
/// and pool never runs out of address space.
const EXPANDABLE_SPAN: u64 = 1 << 44;
/// Simulated addresses stay below this (128 PiB), so that a block's size and address, both
/// multiples of 512 B, each fit 48 bits of its packed set key ([`size_key`]).
const ADDRESS_LIMIT: u64 = 1 << 57;

/// Sizes and addresses in 512 B units stay below this.
const UNIT_LIMIT: u64 = 1 << 48;

/// `BlockComparatorSize` within one stream as one integer, with the block's arena index in
/// the low bits: size, then address, then index. Sizes and addresses are multiples of
/// 512 B below 2^57, so each fits 48 bits; addresses are unique, so the index never decides.
/// A size beyond every block's (a query for more than any device) saturates.
#[inline]
fn size_key(size: u64, ptr: u64, i: u32) -> u128 {
    let units = (size >> 9).min(UNIT_LIMIT - 1);
    (u128::from(units) << 80) | (u128::from(ptr >> 9) << 32) | u128::from(i)
}
/// The size a [`size_key`] holds.
#[inline]
fn key_size(key: u128) -> u64 {
    ((key >> 80) as u64) << 9
}
/// The arena index a [`size_key`] holds.
#[inline]
fn key_block(key: u128) -> u32 {
    key as u32
}
/// `BlockComparatorAddress` as one integer: stream, then address.
fn address_key(stream: u32, ptr: u64) -> u128 {
    (u128::from(stream) << 64) | u128::from(ptr)
}

/// Size classes of a [`SizeSet`]: one per power of two of the size in 512 B units (sizes
/// stay below [`UNIT_LIMIT`]), so that a stream's non-empty classes fit one bitmap word.
/// Measured: on the estimator's group-level trace (what `estimate_simulated` replays)
/// quarter-octave classes were 10% slower (their vectors' headers spread over more cache
/// lines, while the classes stay short anyway); on the tensor-level trace, with many more
/// distinct sizes, 20% faster.
const SIZE_CLASSES: usize = 48;

/// The size class of a [`size_key`]: `floor(log2(size / 512))`, so that classes ascend
/// with sizes.
#[inline]
fn size_class(key: u128) -> usize {
    ((key >> 80) as u64).max(1).ilog2() as usize
}

/// The free mapped blocks of one pool in `BlockComparatorSize` order `(stream, size,
/// address)`, as [`size_key`]s: per stream, per size class, a sorted vector, and per stream
/// a bitmap of the non-empty classes. Every query the allocator makes is an ascending walk
/// from a key within a stream ([`SizeSet::from`]), a descending one below a key
/// ([`SizeSet::before`]), or the whole set in order ([`SizeSet::keys`]).
#[derive(Debug, Default)]
struct SizeSet {
    /// The stream of each slot, in the order the streams were first seen (a trace has a
    /// few streams, so a linear search finds a slot).
    streams: Vec<u32>,
    /// Per slot: bit `c` set when class `c` holds a block.
    occupied: Vec<u64>,
    /// Per slot and class, at `slot * SIZE_CLASSES + class`: the class's keys, ascending.
    classes: Vec<Vec<u128>>,
}

/// A position in a [`SizeSet`]: slot, class and index in the class.
#[derive(Clone, Copy, Debug)]
struct At {
    slot: usize,
    class: usize,
    pos: usize,
}

/// An ascending walk of one stream's keys of a [`SizeSet`] (see [`SizeSet::from`]).
struct Ascending<'a> {
    set: &'a SizeSet,
    /// The next key's position; `None` when the stream has no slot.
    at: Option<At>,
}

impl Ascending<'_> {
    /// The next key with its position.
    #[inline]
    fn next_at(&mut self) -> Option<(u128, At)> {
        let at = self.at.as_mut()?;
        loop {
            if let Some(&key) = self.set.class(at).get(at.pos) {
                let here = *at;
                at.pos += 1;
                return Some((key, here));
            }
            at.class = self.set.next_occupied(at.slot, at.class + 1)?;
            at.pos = 0;
        }
    }
}

impl Iterator for Ascending<'_> {
    type Item = u128;
    #[inline]
    fn next(&mut self) -> Option<u128> {
        self.next_at().map(|(key, _)| key)
    }
}

/// A descending walk of one stream's keys of a [`SizeSet`] (see [`SizeSet::before`]).
struct Descending<'a> {
    set: &'a SizeSet,
    /// `pos`: the keys of the class before this index are still to come, the last first.
    at: Option<At>,
}

impl Iterator for Descending<'_> {
    type Item = u128;
    fn next(&mut self) -> Option<u128> {
        let at = self.at.as_mut()?;
        loop {
            if at.pos > 0 {
                at.pos -= 1;
                return Some(self.set.class(at)[at.pos]);
            }
            at.class = self.set.prev_occupied(at.slot, at.class)?;
            at.pos = self.set.class(at).len();
        }
    }
}

impl SizeSet {
    /// The slot of `stream`, if it has one.
    #[inline]
    fn slot(&self, stream: u32) -> Option<usize> {
        self.streams.iter().position(|&s| s == stream)
    }

    /// The slot of `stream`, made on first use.
    #[inline]
    fn slot_mut(&mut self, stream: u32) -> usize {
        self.slot(stream).unwrap_or_else(|| {
            self.streams.push(stream);
            self.occupied.push(0);
            self.classes
                .resize_with(self.streams.len() * SIZE_CLASSES, Vec::new);
            self.streams.len() - 1
        })
    }

    /// The keys of the class at `at`.
    #[inline]
    fn class(&self, at: &At) -> &[u128] {
        &self.classes[at.slot * SIZE_CLASSES + at.class]
    }

    /// The first non-empty class of `slot` at or after `c`.
    #[inline]
    fn next_occupied(&self, slot: usize, c: usize) -> Option<usize> {
        let bits = self.occupied[slot] & u64::MAX.checked_shl(c as u32)?;
        (bits != 0).then(|| bits.trailing_zeros() as usize)
    }

    /// The last non-empty class of `slot` before `c`.
    fn prev_occupied(&self, slot: usize, c: usize) -> Option<usize> {
        let bits = self.occupied[slot] & ((1u64 << c) - 1);
        (bits != 0).then(|| 63 - bits.leading_zeros() as usize)
    }

    /// The first position of `stream` not below `key`: in `key`'s class, after the keys
    /// below it.
    #[inline]
    fn locate(&self, stream: u32, key: u128) -> Option<At> {
        let slot = self.slot(stream)?;
        let class = size_class(key);
        let keys = &self.classes[slot * SIZE_CLASSES + class];
        // Often no key of the class is below `key` (a request the size of the cached blocks
        // there): no search then.
        let pos = match keys.first() {
            Some(&first) if first < key => keys.partition_point(|&k| k < key),
            _ => 0,
        };
        Some(At { slot, class, pos })
    }

    #[inline]
    fn insert(&mut self, stream: u32, key: u128) {
        let slot = self.slot_mut(stream);
        let class = size_class(key);
        let keys = &mut self.classes[slot * SIZE_CLASSES + class];
        match keys.last() {
            Some(&last) if last > key => {
                let at = keys.partition_point(|&k| k < key);
                keys.insert(at, key);
            }
            _ => keys.push(key),
        }
        self.occupied[slot] |= 1 << class;
    }

    /// Removes `key` of `stream`, which must be in the set.
    #[inline]
    fn remove(&mut self, stream: u32, key: u128) {
        let at = self.locate(stream, key);
        debug_assert!(
            at.is_some_and(|a| self.class(&a).get(a.pos) == Some(&key)),
            "removing a block that is not in its pool"
        );
        if let Some(at) = at {
            self.remove_at(at);
        }
    }

    /// Removes the key at `at` (from [`Ascending::next_at`]).
    #[inline]
    fn remove_at(&mut self, at: At) {
        let keys = &mut self.classes[at.slot * SIZE_CLASSES + at.class];
        keys.remove(at.pos);
        if keys.is_empty() {
            self.occupied[at.slot] &= !(1 << at.class);
        }
    }

    /// The keys of `stream` at or after `key`, ascending.
    #[inline]
    fn from(&self, stream: u32, key: u128) -> Ascending<'_> {
        Ascending {
            set: self,
            at: self.locate(stream, key),
        }
    }

    /// The keys of `stream` below `key`, descending.
    fn before(&self, stream: u32, key: u128) -> Descending<'_> {
        Descending {
            set: self,
            at: self.locate(stream, key),
        }
    }

    /// Every key, in `(stream, size, address)` order.
    fn keys(&self) -> impl Iterator<Item = &u128> + '_ {
        let mut slots: Vec<usize> = (0..self.streams.len()).collect();
        slots.sort_unstable_by_key(|&k| self.streams[k]);
        slots.into_iter().flat_map(move |k| {
            self.classes[k * SIZE_CLASSES..(k + 1) * SIZE_CLASSES]
                .iter()
                .flatten()
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.classes.iter().map(Vec::len).sum()
    }
}

/// A fast hasher for allocation ids (folded 128-bit multiply), in place of SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

type IdMap = HashMap<u64, u32, BuildHasherDefault<IdHasher>>;

/// Ids below this index [`LiveMap`]'s vector (at most 4 MiB of slots); others hash.
const DENSE_IDS: u64 = 1 << 20;
/// A [`LiveMap`] slot with no live allocation (arena indices never come near it).
const VACANT: u32 = u32::MAX - 1;

/// Live allocations: id -> block, with the calls of a `HashMap`. Traces number their
/// allocations from 0 or 1 upwards, so small ids index a vector (one load, no hashing);
/// larger ones go to a hash map.
#[derive(Debug, Default)]
struct LiveMap {
    /// Id -> block, or [`VACANT`].
    dense: Vec<u32>,
    sparse: IdMap,
    len: usize,
}

impl LiveMap {
    fn reserve(&mut self, n: usize) {
        self.dense.reserve(n.min(DENSE_IDS as usize));
    }
    fn len(&self) -> usize {
        self.len
    }
    #[inline]
    fn get(&self, id: &u64) -> Option<&u32> {
        if *id < DENSE_IDS {
            self.dense.get(*id as usize).filter(|&&b| b != VACANT)
        } else {
            self.sparse.get(id)
        }
    }
    #[inline]
    fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }
    /// Adds `id`, which must not be live.
    #[inline]
    fn insert(&mut self, id: u64, block: u32) {
        debug_assert!(!self.contains_key(&id));
        self.len += 1;
        if id < DENSE_IDS {
            let k = id as usize;
            if k >= self.dense.len() {
                self.grow(k);
            }
            self.dense[k] = block;
        } else {
            self.sparse.insert(id, block);
        }
    }
    /// Makes vacant slots up to id `k` (at least doubling, so that rising ids grow the
    /// vector in few steps).
    #[cold]
    fn grow(&mut self, k: usize) {
        let to = (k + 1).max(2 * self.dense.len()).min(DENSE_IDS as usize);
        self.dense.resize(to, VACANT);
    }
    #[inline]
    fn remove(&mut self, id: &u64) -> Option<u32> {
        let block = if *id < DENSE_IDS {
            let slot = self.dense.get_mut(*id as usize)?;
            Some(std::mem::replace(slot, VACANT)).filter(|&b| b != VACANT)
        } else {
            self.sparse.remove(id)
        };
        self.len -= usize::from(block.is_some());
        block
    }
    /// Every live id with its block, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let dense = self.dense.iter().enumerate().filter(|(_, &b)| b != VACANT);
        let dense = dense.map(|(id, &b)| (id as u64, b));
        dense.chain(self.sparse.iter().map(|(&id, &b)| (id, b)))
    }
}

const NIL: u32 = u32::MAX;

/// `round_size`: requests below 512 B take 512 B; others round up to a multiple of 512 B,
/// or, where `roundup_power2_divisions` gives `d > 1` divisions for the size's interval and
/// the size exceeds `512 * d`, up to the next of `d` equal steps between the surrounding
/// powers of two (`roundup_power2_next_division`; a power of two stays as it is).
///
/// ```
/// use memplan::allocator::{round_size, AllocConf};
/// let plain = AllocConf::default();
/// assert_eq!(round_size(1, &plain), 512);
/// assert_eq!(round_size(513, &plain), 1024);
/// let four = AllocConf::parse("roundup_power2_divisions:4").unwrap();
/// // 1200 lies in [1024, 2048): steps of 256 -> 1280.
/// assert_eq!(round_size(1200 * 1024, &four), 1280 * 1024);
/// ```
pub fn round_size(size: u64, conf: &AllocConf) -> u64 {
    if size < MIN_BLOCK_SIZE {
        return MIN_BLOCK_SIZE;
    }
    let divisions = conf.divisions_for(size);
    if divisions > 1 && size > MIN_BLOCK_SIZE * divisions {
        roundup_power2_next_division(size, divisions)
    } else {
        size.div_ceil(MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
    }
}

/// `roundup_power2_next_division` (CUDACachingAllocator.cpp / CachingDeviceAllocator).
fn roundup_power2_next_division(size: u64, divisions: u64) -> u64 {
    if size.is_power_of_two() {
        return size;
    }
    let floor = 1u64 << size.ilog2();
    let step = floor >> divisions.ilog2();
    if step == 0 {
        return floor << 1;
    }
    let down = size & !(step - 1);
    if down == size {
        size
    } else {
        down + step
    }
}

/// `get_allocation_size`: the segment a new `cudaMalloc` takes for a rounded request: 2 MiB
/// for the small pool (<= 1 MiB), 20 MiB below 10 MiB, otherwise the request rounded up to a
/// multiple of 2 MiB.
///
/// ```
/// use memplan::allocator::allocation_size;
/// assert_eq!(allocation_size(512), 2 << 20);
/// assert_eq!(allocation_size(5 << 20), 20 << 20);
/// assert_eq!(allocation_size(11 << 20), 12 << 20);
/// ```
pub fn allocation_size(size: u64) -> u64 {
    if size <= SMALL_SIZE {
        SMALL_BUFFER
    } else if size < MIN_LARGE_ALLOC {
        LARGE_BUFFER
    } else {
        size.div_ceil(ROUND_LARGE) * ROUND_LARGE
    }
}

/// An allocation the allocator could not satisfy even after releasing its cache: what
/// PyTorch reports as `torch.OutOfMemoryError` ("CUDA out of memory. Tried to allocate ...").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Oom {
    /// The allocation's id in the trace.
    pub id: u64,
    /// Bytes requested.
    pub requested: u64,
    /// The request after `round_size`.
    pub rounded: u64,
    /// The segment `cudaMalloc` would have needed (`get_allocation_size`), the figure
    /// PyTorch's message quotes.
    pub alloc_size: u64,
    pub stream: u32,
    /// Allocated bytes at the failure.
    pub allocated: u64,
    /// Reserved bytes at the failure, after the cache was released.
    pub reserved: u64,
    /// The capacity the allocator was given.
    pub capacity: u64,
}

impl fmt::Display for Oom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of memory: tried to allocate {} (request {} of id {} on stream {}); capacity \
             {}, of which {} allocated and {} reserved but unallocated",
            Bytes(self.alloc_size),
            Bytes(self.requested),
            self.id,
            self.stream,
            Bytes(self.capacity),
            Bytes(self.allocated),
            Bytes(self.reserved.saturating_sub(self.allocated)),
        )
    }
}

/// Why an event could not be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimError {
    /// The device capacity was exhausted.
    Oom(Oom),
    /// An allocation id that is still live was allocated again.
    DuplicateId(u64),
    /// A free of an id that is not live.
    UnknownId(u64),
    /// A request larger than [`MAX_REQUEST`].
    TooLarge { id: u64, bytes: u64 },
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Oom(o) => o.fmt(f),
            SimError::DuplicateId(id) => write!(f, "allocation id {id} is already live"),
            SimError::UnknownId(id) => write!(f, "free of allocation id {id}, which is not live"),
            SimError::TooLarge { id, bytes } => {
                write!(
                    f,
                    "allocation id {id} requests {bytes} bytes, beyond any device"
                )
            }
        }
    }
}

impl std::error::Error for SimError {}

#[derive(Clone, Copy, Debug)]
struct Block {
    ptr: u64,
    size: u64,
    stream: u32,
    prev: u32,
    next: u32,
    allocated: bool,
    small: bool,
    expandable: bool,
    mapped: bool,
}

/// `BlockPool`: free mapped blocks by `BlockComparatorSize`, unmapped expandable ranges by
/// `BlockComparatorAddress`.
#[derive(Default, Debug)]
struct Pool {
    blocks: SizeSet,
    unmapped: BTreeMap<u128, u32>,
}

/// What happened to device memory: the segment actions of PyTorch's `TraceEntry`
/// (c10/core/CachingDeviceAllocator.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentOp {
    /// `SEGMENT_ALLOC`: a new `cudaMalloc` segment (`alloc_block`).
    Alloc,
    /// `SEGMENT_FREE`: a cached segment returned with `cudaFree` (`release_block`, on the
    /// out-of-memory path).
    Free,
    /// `SEGMENT_MAP`: pages mapped into an expandable segment (`map_block`).
    Map,
    /// `SEGMENT_UNMAP`: free pages of an expandable segment unmapped (`unmap_block`).
    Unmap,
}

/// One entry of the segment log ([`Simulator::log_segments`]), with the address and size
/// PyTorch records: the whole segment for [`SegmentOp::Alloc`] and [`SegmentOp::Free`],
/// the mapped or unmapped range (whole pages) for [`SegmentOp::Map`] and
/// [`SegmentOp::Unmap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentEvent {
    pub op: SegmentOp,
    pub addr: u64,
    pub size: u64,
    pub stream: u32,
    /// From the small pool (requests of at most 1 MiB).
    pub small: bool,
}

/// One block of a [`SegmentInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    pub addr: u64,
    /// The block's size: the request rounded, or more where the block was not split.
    pub size: u64,
    /// The live allocation it holds; `None` for a free (cached) block.
    pub id: Option<u64>,
}

/// A segment as `torch.cuda.memory._snapshot()` lists it: a `cudaMalloc` segment, or one
/// contiguous mapped range of an expandable segment; its blocks tile it in address order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub addr: u64,
    pub size: u64,
    pub stream: u32,
    pub small: bool,
    pub expandable: bool,
    pub blocks: Vec<BlockInfo>,
}

/// Counters PyTorch keeps in `DeviceStats` that the simulation reproduces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `num_device_alloc`: `cudaMalloc` calls and expandable page mappings.
    pub device_allocs: u64,
    /// `num_device_free`: `cudaFree` calls and expandable unmappings.
    pub device_frees: u64,
    /// `num_alloc_retries`: allocations that needed the release-everything retry.
    pub alloc_retries: u64,
    /// `num_ooms`.
    pub ooms: u64,
}

/// One device's `DeviceCachingAllocator`, replayed from alloc/free events.
///
/// ```
/// use memplan::allocator::{AllocConf, Simulator};
/// let mut sim = Simulator::new(AllocConf::default(), None);
/// sim.alloc(1, 5 << 20, 0).unwrap(); // 5 MiB takes a 20 MiB segment
/// assert_eq!(sim.reserved().get(), 20 << 20);
/// sim.free(1).unwrap();
/// assert_eq!(sim.allocated().get(), 0);
/// assert_eq!(sim.reserved().get(), 20 << 20); // cached, not returned
/// ```
#[derive(Debug)]
pub struct Simulator {
    conf: AllocConf,
    capacity: Option<u64>,
    arena: Vec<Block>,
    vacant: Vec<u32>,
    /// Index 0: small pool; 1: large pool.
    pools: [Pool; 2],
    /// Live allocations: id -> block (NIL for a zero-byte allocation, which PyTorch serves
    /// with a null pointer and no block).
    live: LiveMap,
    allocated: u64,
    reserved: u64,
    peak_allocated: u64,
    peak_reserved: u64,
    next_addr: u64,
    segments: usize,
    expandable_segments: usize,
    counters: Counters,
    /// Whether [`Simulator::log_segments`] is on; `segment_log` stays empty otherwise.
    log: bool,
    segment_log: Vec<SegmentEvent>,
}

impl Simulator {
    /// A fresh allocator. `capacity` bounds the bytes it may reserve (the device's free
    /// memory, or `per_process_memory_fraction` times the total); `None` is unbounded.
    pub fn new(conf: AllocConf, capacity: Option<u64>) -> Simulator {
        Simulator {
            conf,
            capacity,
            arena: Vec::new(),
            vacant: Vec::new(),
            pools: [Pool::default(), Pool::default()],
            live: LiveMap::default(),
            allocated: 0,
            reserved: 0,
            peak_allocated: 0,
            peak_reserved: 0,
            next_addr: 1 << 32,
            segments: 0,
            expandable_segments: 0,
            counters: Counters::default(),
            log: false,
            segment_log: Vec::new(),
        }
    }

    /// Makes room for `n` live allocations and blocks up front (a replay knows its length).
    pub fn reserve(&mut self, n: usize) {
        self.live.reserve(n);
        self.arena.reserve(n);
    }

    pub fn conf(&self) -> &AllocConf {
        &self.conf
    }
    /// Bytes in allocated blocks (`allocated_bytes.all.current`): rounded sizes, and whole
    /// blocks where a block was not split.
    pub fn allocated(&self) -> Bytes {
        Bytes(self.allocated)
    }
    /// Bytes the allocator holds from the device (`reserved_bytes.all.current`).
    pub fn reserved(&self) -> Bytes {
        Bytes(self.reserved)
    }
    pub fn peak_allocated(&self) -> Bytes {
        Bytes(self.peak_allocated)
    }
    pub fn peak_reserved(&self) -> Bytes {
        Bytes(self.peak_reserved)
    }
    /// Live allocations (zero-byte ones included).
    pub fn live_allocations(&self) -> usize {
        self.live.len()
    }
    /// Segments held: `cudaMalloc` segments plus live expandable segments.
    pub fn segments(&self) -> usize {
        self.segments + self.expandable_segments
    }
    pub fn counters(&self) -> Counters {
        self.counters
    }
    /// The largest cached free block of any pool and stream (`cacheInfo` without its
    /// `cudaMemGetInfo` initial guess). Walks the pools: for reports, not per event.
    pub fn largest_free_block(&self) -> Bytes {
        let largest = self
            .pools
            .iter()
            .flat_map(|p| p.blocks.keys())
            .map(|&k| key_size(k))
            .max()
            .unwrap_or(0);
        Bytes(largest)
    }

    /// The simulated address and size of the block serving live allocation `id`; `None`
    /// when `id` is not live or is a zero-byte allocation (PyTorch hands out a null pointer
    /// and no block for those).
    ///
    /// ```
    /// use memplan::allocator::{AllocConf, Simulator};
    /// let mut sim = Simulator::new(AllocConf::default(), None);
    /// sim.alloc(1, 1000, 0).unwrap();
    /// let (_addr, size) = sim.block_of(1).unwrap();
    /// assert_eq!(size, 1024); // 1000 B rounded up to a multiple of 512 B
    /// assert_eq!(sim.block_of(2), None);
    /// ```
    pub fn block_of(&self, id: u64) -> Option<(u64, u64)> {
        match self.live.get(&id) {
            Some(&i) if i != NIL => Some((self.b(i).ptr, self.b(i).size)),
            _ => None,
        }
    }

    /// Turns the segment log on or off. While on, every reservation and release of device
    /// memory appends a [`SegmentEvent`], in the order PyTorch records them; read them with
    /// [`Simulator::drain_segment_events`]. Off (the default), nothing is recorded.
    ///
    /// ```
    /// use memplan::allocator::{AllocConf, SegmentOp, Simulator};
    /// let mut sim = Simulator::new(AllocConf::default(), None);
    /// sim.log_segments(true);
    /// sim.alloc(1, 5 << 20, 0).unwrap(); // 5 MiB: a new 20 MiB segment
    /// sim.alloc(2, 5 << 20, 0).unwrap(); // from its cached remainder: nothing new
    /// let log: Vec<_> = sim.drain_segment_events().collect();
    /// assert_eq!(log.len(), 1);
    /// assert_eq!((log[0].op, log[0].size), (SegmentOp::Alloc, 20 << 20));
    /// assert_eq!(log[0].addr, sim.block_of(1).unwrap().0);
    /// ```
    pub fn log_segments(&mut self, on: bool) {
        self.log = on;
    }

    /// The segment events logged since the last call, oldest first.
    pub fn drain_segment_events(&mut self) -> std::vec::Drain<'_, SegmentEvent> {
        self.segment_log.drain(..)
    }

    /// The segments held now, by address, each with its blocks (what the `segments` list
    /// of `torch.cuda.memory._snapshot()` holds: `cudaMalloc` segments whole, expandable
    /// segments as one entry per contiguous mapped range). Walks every block: for reports,
    /// not per event.
    pub fn segment_infos(&self) -> Vec<SegmentInfo> {
        let owner: HashMap<u32, u64> = self
            .live
            .iter()
            .filter(|&(_, i)| i != NIL)
            .map(|(id, i)| (i, id))
            .collect();
        let heads = self
            .pools
            .iter()
            .flat_map(|p| {
                let free = p.blocks.keys().map(|&k| key_block(k));
                free.chain(p.unmapped.values().copied())
            })
            .chain(owner.keys().copied())
            .filter(|&i| self.b(i).prev == NIL);
        let mut out = Vec::new();
        for head in heads {
            let mut current: Option<SegmentInfo> = None;
            let mut i = head;
            while i != NIL {
                let b = *self.b(i);
                if b.mapped {
                    let seg = current.get_or_insert_with(|| SegmentInfo {
                        addr: b.ptr,
                        size: 0,
                        stream: b.stream,
                        small: b.small,
                        expandable: b.expandable,
                        blocks: Vec::new(),
                    });
                    seg.size += b.size;
                    seg.blocks.push(BlockInfo {
                        addr: b.ptr,
                        size: b.size,
                        id: owner.get(&i).copied(),
                    });
                } else if let Some(seg) = current.take() {
                    out.push(seg);
                }
                i = b.next;
            }
            out.extend(current);
        }
        out.sort_by_key(|s| s.addr);
        out
    }

    /// Appends to the segment log when it is on. Called only where device memory is
    /// reserved or released.
    fn log_segment(&mut self, op: SegmentOp, i: u32, addr: u64, size: u64) {
        if self.log {
            let b = self.b(i);
            let (stream, small) = (b.stream, b.small);
            self.segment_log.push(SegmentEvent {
                op,
                addr,
                size,
                stream,
                small,
            });
        }
    }

    fn new_block(&mut self, b: Block) -> u32 {
        match self.vacant.pop() {
            Some(i) => {
                self.arena[i as usize] = b;
                i
            }
            None => {
                self.arena.push(b);
                (self.arena.len() - 1) as u32
            }
        }
    }
    fn drop_block(&mut self, i: u32) {
        self.vacant.push(i);
    }
    fn b(&self, i: u32) -> &Block {
        &self.arena[i as usize]
    }
    fn bm(&mut self, i: u32) -> &mut Block {
        &mut self.arena[i as usize]
    }
    fn pool_of(&self, i: u32) -> usize {
        usize::from(!self.b(i).small)
    }
    fn insert_free(&mut self, i: u32) {
        let b = self.b(i);
        let (p, stream, k) = (usize::from(!b.small), b.stream, size_key(b.size, b.ptr, i));
        self.pools[p].blocks.insert(stream, k);
    }
    fn remove_free(&mut self, i: u32) {
        let b = self.b(i);
        let (p, stream, k) = (usize::from(!b.small), b.stream, size_key(b.size, b.ptr, i));
        self.pools[p].blocks.remove(stream, k);
    }
    fn insert_unmapped(&mut self, i: u32) {
        let p = self.pool_of(i);
        let k = address_key(self.b(i).stream, self.b(i).ptr);
        self.pools[p].unmapped.insert(k, i);
    }
    fn remove_unmapped(&mut self, i: u32) {
        let p = self.pool_of(i);
        let k = address_key(self.b(i).stream, self.b(i).ptr);
        self.pools[p].unmapped.remove(&k);
    }
    fn add_reserved(&mut self, n: u64) {
        self.reserved += n;
        self.peak_reserved = self.peak_reserved.max(self.reserved);
    }
    fn fits(&self, extra: u64) -> bool {
        self.capacity
            .is_none_or(|c| self.reserved.saturating_add(extra) <= c)
    }

    /// `DeviceCachingAllocator::malloc`: serve `bytes` for allocation `id` on `stream`.
    ///
    /// The order is the source's: best fit from the cache (`get_free_block`); else a new
    /// segment (`alloc_block`); else release oversize cached blocks
    /// (`release_available_cached_blocks`, only with `max_split_size_mb`) and retry; else
    /// release every unsplit cached segment of every pool and stream
    /// (`release_cached_blocks`) and retry once more; else out of memory. The found block is
    /// split when `should_split` says so (`alloc_found_block`).
    pub fn alloc(&mut self, id: u64, bytes: u64, stream: u32) -> Result<(), SimError> {
        if self.live.contains_key(&id) {
            return Err(SimError::DuplicateId(id));
        }
        if bytes == 0 {
            // `CUDACachingAllocator::allocate` returns a null pointer for size 0 without
            // calling `malloc`.
            self.live.insert(id, NIL);
            return Ok(());
        }
        if bytes > MAX_REQUEST {
            return Err(SimError::TooLarge { id, bytes });
        }
        let size = round_size(bytes, &self.conf);
        let pool = usize::from(size > SMALL_SIZE); // `get_pool`
        let alloc_size = allocation_size(size);

        let mut found = self.get_free_block(pool, stream, size);
        if found.is_none() {
            found = self.alloc_block(pool, stream, size, alloc_size);
        }
        if found.is_none() && self.release_available_cached_blocks(pool, stream, size) {
            found = self.alloc_block(pool, stream, size, alloc_size);
        }
        if found.is_none() {
            self.release_cached_blocks();
            self.counters.alloc_retries += 1;
            found = self.alloc_block(pool, stream, size, alloc_size);
        }
        let Some(block) = found else {
            self.counters.ooms += 1;
            return Err(SimError::Oom(Oom {
                id,
                requested: bytes,
                rounded: size,
                alloc_size,
                stream,
                allocated: self.allocated,
                reserved: self.reserved,
                capacity: self.capacity.unwrap_or(u64::MAX),
            }));
        };
        let block = if self.should_split(block, size) {
            self.split(block, size)
        } else {
            block
        };
        self.bm(block).allocated = true;
        self.allocated += self.b(block).size;
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        self.live.insert(id, block);
        Ok(())
    }

    /// `DeviceCachingAllocator::free` -> `free_block`: the block goes back to its pool and
    /// merges with free neighbours of its segment (`try_merge_blocks`). Nothing is returned
    /// to the device.
    pub fn free(&mut self, id: u64) -> Result<(), SimError> {
        let block = self.live.remove(&id).ok_or(SimError::UnknownId(id))?;
        if block == NIL {
            return Ok(());
        }
        self.allocated -= self.b(block).size;
        self.bm(block).allocated = false;
        let (prev, next) = (self.b(block).prev, self.b(block).next);
        self.try_merge(block, prev);
        self.try_merge(block, next);
        self.insert_free(block);
        Ok(())
    }

    /// `get_free_block`: the first free block of the pool at or after `(stream, size, 0)` in
    /// `BlockComparatorSize` order, i.e. the smallest block of this stream that fits, lowest
    /// address first. Expandable blocks are ranked by the size they could grow to (their
    /// size plus a following unmapped range). A request below `max_split_size` never takes a
    /// block of at least `max_split_size`; a request at or above it takes a block only less
    /// than `max_non_split_rounding_size` larger.
    fn get_free_block(&mut self, pool: usize, stream: u32, size: u64) -> Option<u32> {
        let mut range = self.pools[pool].blocks.from(stream, size_key(size, 0, 0));
        let mut next = || range.next_at().map(|(k, at)| (key_block(k), at));
        let (mut it, mut at) = next()?;
        if self.b(it).expandable {
            if self.conf.expandable_segments {
                let grow = |i: u32| {
                    let b = &self.arena[i as usize];
                    let next = if b.next != NIL && !self.arena[b.next as usize].mapped {
                        self.arena[b.next as usize].size
                    } else {
                        0
                    };
                    b.size + next
                };
                while self.b(it).expandable {
                    match next() {
                        Some((n, n_at)) if grow(n) < grow(it) => (it, at) = (n, n_at),
                        _ => break,
                    }
                }
            } else {
                // Expandable segments were turned off: only non-expandable blocks qualify.
                loop {
                    (it, at) = next()?;
                    if !self.b(it).expandable {
                        break;
                    }
                }
            }
        }
        let found = self.b(it).size;
        let max_split = self.conf.max_split_size;
        if size < max_split && found >= max_split {
            return None;
        }
        if size >= max_split && found >= size.saturating_add(self.conf.max_non_split_rounding_size)
        {
            return None;
        }
        self.pools[pool].blocks.remove_at(at);
        Some(it)
    }

    /// `should_split`: the small pool (and every pool under expandable segments) splits when
    /// at least 512 B would remain; the large pool when more than 1 MiB would remain and the
    /// request is below `max_split_size`.
    fn should_split(&self, block: u32, size: u64) -> bool {
        let b = self.b(block);
        let remaining = b.size - size;
        if b.small || self.conf.expandable_segments {
            remaining >= MIN_BLOCK_SIZE
        } else {
            size < self.conf.max_split_size && remaining > SMALL_SIZE
        }
    }

    /// `alloc_found_block` with `split_remainder`: the front `size` bytes become the
    /// allocation; the remainder stays in the pool.
    fn split(&mut self, rest: u32, size: u64) -> u32 {
        let r = *self.b(rest);
        let front = self.new_block(Block {
            ptr: r.ptr,
            size,
            prev: r.prev,
            next: rest,
            ..r
        });
        if r.prev != NIL {
            self.bm(r.prev).next = front;
        }
        let rb = self.bm(rest);
        rb.prev = front;
        rb.ptr += size;
        rb.size -= size;
        self.insert_free(rest);
        front
    }

    /// `try_merge_blocks`: `dst` absorbs `src` when `src` is free and mapped alike. `dst`
    /// must be out of the pool sets; `src` is taken out of its set and dropped.
    fn try_merge(&mut self, dst: u32, src: u32) -> u64 {
        if src == NIL || self.b(src).allocated || self.b(src).mapped != self.b(dst).mapped {
            return 0;
        }
        if self.b(src).mapped {
            self.remove_free(src);
        } else {
            self.remove_unmapped(src);
        }
        let s = *self.b(src);
        if self.b(dst).prev == src {
            let d = self.bm(dst);
            d.ptr = s.ptr;
            d.prev = s.prev;
            if s.prev != NIL {
                self.bm(s.prev).next = dst;
            }
        } else {
            self.bm(dst).next = s.next;
            if s.next != NIL {
                self.bm(s.next).prev = dst;
            }
        }
        self.bm(dst).size += s.size;
        self.drop_block(src);
        s.size
    }

    /// `alloc_block`: a new segment of `alloc_size` bytes, or under expandable segments the
    /// pages that make room for `size` (`try_allocate_expandable_block`). Fails when the
    /// capacity would be exceeded (the `set_fraction` check against
    /// `allowed_memory_maximum`, which is done before either path).
    fn alloc_block(&mut self, pool: usize, stream: u32, size: u64, alloc_size: u64) -> Option<u32> {
        if !self.fits(alloc_size) {
            return None;
        }
        if self.conf.expandable_segments {
            return self.try_allocate_expandable_block(pool, stream, size);
        }
        let ptr = self.next_addr;
        let end = ptr + alloc_size.div_ceil(ROUND_LARGE) * ROUND_LARGE;
        if end > ADDRESS_LIMIT {
            return None; // simulated address space exhausted: treated as out of memory
        }
        self.next_addr = end;
        let block = self.new_block(Block {
            ptr,
            size: alloc_size,
            stream,
            prev: NIL,
            next: NIL,
            allocated: false,
            small: pool == 0,
            expandable: false,
            mapped: true,
        });
        self.segments += 1;
        self.counters.device_allocs += 1;
        self.add_reserved(alloc_size);
        self.log_segment(SegmentOp::Alloc, block, ptr, alloc_size);
        Some(block)
    }

    /// `release_available_cached_blocks`: with `max_split_size` set, free the smallest cached
    /// unsplit block of this stream at least `max(size, max_split_size)`; failing that, free
    /// oversize blocks from the largest down until that many bytes are released. Expandable
    /// blocks are skipped.
    fn release_available_cached_blocks(&mut self, pool: usize, stream: u32, size: u64) -> bool {
        let max_split = self.conf.max_split_size;
        if max_split == u64::MAX {
            return false;
        }
        let key = size.max(max_split);
        let at = self.pools[pool]
            .blocks
            .from(stream, size_key(key, 0, 0))
            .next()
            .map(key_block);
        match at {
            Some(i) if !self.b(i).expandable => {
                self.release_block(i);
                true
            }
            _ => {
                let mut released = 0u64;
                let candidates: Vec<u32> = self.pools[pool]
                    .blocks
                    .before(stream, size_key(key, 0, 0))
                    .map(key_block)
                    .take_while(|&i| self.arena[i as usize].size >= max_split)
                    .collect();
                for i in candidates {
                    if released >= key {
                        break;
                    }
                    if !self.b(i).expandable {
                        released += self.b(i).size;
                        self.release_block(i);
                    }
                }
                released >= key
            }
        }
    }

    /// `release_block`: `cudaFree` of an unsplit cached segment.
    fn release_block(&mut self, i: u32) {
        debug_assert!(self.b(i).prev == NIL && self.b(i).next == NIL && !self.b(i).expandable);
        self.remove_free(i);
        let (ptr, size) = (self.b(i).ptr, self.b(i).size);
        self.log_segment(SegmentOp::Free, i, ptr, size);
        self.reserved -= size;
        self.segments -= 1;
        self.counters.device_frees += 1;
        self.drop_block(i);
    }

    /// `release_cached_blocks` -> `release_blocks` on the large then the small pool: every
    /// cached segment that is not split is freed; under expandable segments every free
    /// block's whole pages are unmapped (`unmap_block`) and a segment left with no mapped
    /// page is dropped (`release_expandable_segment`).
    fn release_cached_blocks(&mut self) {
        for pool in [1, 0] {
            let mut to_unmap = Vec::new();
            let mut to_release = Vec::new();
            for i in self.pools[pool].blocks.keys().map(|&k| key_block(k)) {
                let b = &self.arena[i as usize];
                if b.expandable {
                    to_unmap.push(i);
                } else if b.prev == NIL && b.next == NIL {
                    to_release.push(i);
                }
            }
            for i in to_release {
                self.release_block(i);
            }
            for i in to_unmap {
                self.unmap_block(i);
                let b = self.b(i);
                if !b.mapped && b.prev == NIL && b.next == NIL {
                    self.remove_unmapped(i);
                    self.drop_block(i);
                    self.expandable_segments -= 1;
                }
            }
        }
    }

    fn page_size(&self, i: u32) -> u64 {
        if self.b(i).small {
            SMALL_BUFFER
        } else {
            LARGE_BUFFER
        }
    }

    /// `find_expandable_block`: the lowest-address unmapped range of this stream's segment
    /// (together with a free mapped block right before it) that gives `size` bytes of room;
    /// otherwise a new segment (one per stream and pool in practice, see
    /// [`EXPANDABLE_SPAN`]).
    fn find_expandable_block(&mut self, pool: usize, stream: u32, size: u64) -> Option<u32> {
        let allocatable = |i: u32| i != NIL && !self.arena[i as usize].allocated;
        let has_room = |mut i: u32| {
            let mut bytes = 0u64;
            while bytes < size && allocatable(i) {
                bytes += self.arena[i as usize].size;
                i = self.arena[i as usize].next;
            }
            bytes >= size
        };
        let found = self.pools[pool]
            .unmapped
            .range(address_key(stream, 0)..=address_key(stream, u64::MAX))
            .map(|(_, &i)| {
                let prev = self.arena[i as usize].prev;
                if allocatable(prev) {
                    prev
                } else {
                    i
                }
            })
            .find(|&c| has_room(c));
        if found.is_some() {
            return found;
        }
        let page = if pool == 0 {
            SMALL_BUFFER
        } else {
            LARGE_BUFFER
        };
        let ptr = self.next_addr.div_ceil(page) * page;
        if ptr + EXPANDABLE_SPAN > ADDRESS_LIMIT {
            return None; // simulated address space exhausted: treated as out of memory
        }
        self.next_addr = ptr + EXPANDABLE_SPAN;
        let block = self.new_block(Block {
            ptr,
            size: EXPANDABLE_SPAN,
            stream,
            prev: NIL,
            next: NIL,
            allocated: false,
            small: pool == 0,
            expandable: true,
            mapped: false,
        });
        self.insert_unmapped(block);
        self.expandable_segments += 1;
        Some(block)
    }

    /// `try_allocate_expandable_block`: map pages at the candidate until it holds `size`
    /// contiguous free bytes.
    fn try_allocate_expandable_block(
        &mut self,
        pool: usize,
        stream: u32,
        size: u64,
    ) -> Option<u32> {
        let mut c = self.find_expandable_block(pool, stream, size)?;
        if !self.b(c).mapped {
            let want = self.b(c).size.min(size);
            if !self.map_block(c, want) {
                return None;
            }
        }
        while self.b(c).size < size {
            let remaining = size - self.b(c).size;
            let next = self.b(c).next;
            let want = remaining.min(self.b(next).size);
            if !self.map_block(next, want) {
                return None;
            }
            c = next;
        }
        self.remove_free(c);
        Some(c)
    }

    /// `map_block` / `ExpandableSegment::map`: back `size` bytes at the start of an unmapped
    /// range with whole pages (2 MiB small pool, 20 MiB large pool), split off the rest, and
    /// merge with free mapped neighbours. Fails when the pages exceed the capacity (the
    /// `cuMemCreate` out-of-memory case).
    fn map_block(&mut self, i: u32, size: u64) -> bool {
        let page = self.page_size(i);
        let mapped = size.div_ceil(page) * page;
        if mapped == 0 || !self.fits(mapped) {
            return false;
        }
        self.remove_unmapped(i);
        self.bm(i).mapped = true;
        let b = *self.b(i);
        self.log_segment(SegmentOp::Map, i, b.ptr, mapped);
        if mapped < b.size {
            let rest = self.new_block(Block {
                ptr: b.ptr + mapped,
                size: b.size - mapped,
                prev: i,
                next: b.next,
                mapped: false,
                ..b
            });
            if b.next != NIL {
                self.bm(b.next).prev = rest;
            }
            self.bm(i).next = rest;
            self.bm(i).size = mapped;
            self.insert_unmapped(rest);
        }
        let prev = self.b(i).prev;
        self.try_merge(i, prev);
        let next = self.b(i).next;
        self.try_merge(i, next);
        self.insert_free(i);
        self.add_reserved(mapped);
        self.counters.device_allocs += 1;
        true
    }

    /// `unmap_block` / `ExpandableSegment::unmap`: return the whole pages inside a free
    /// block; the partial pages at either end stay mapped as free blocks.
    fn unmap_block(&mut self, i: u32) {
        let page = self.page_size(i);
        let b = *self.b(i);
        let begin = b.ptr.div_ceil(page) * page;
        let end = (b.ptr + b.size) / page * page;
        if begin >= end {
            return;
        }
        self.remove_free(i);
        self.log_segment(SegmentOp::Unmap, i, begin, end - begin);
        if begin > b.ptr {
            let before = self.new_block(Block {
                size: begin - b.ptr,
                prev: b.prev,
                next: i,
                ..b
            });
            if b.prev != NIL {
                self.bm(b.prev).next = before;
            }
            self.bm(i).prev = before;
            self.insert_free(before);
        }
        if end < b.ptr + b.size {
            let after = self.new_block(Block {
                ptr: end,
                size: b.ptr + b.size - end,
                prev: i,
                next: b.next,
                ..b
            });
            if b.next != NIL {
                self.bm(b.next).prev = after;
            }
            self.bm(i).next = after;
            self.insert_free(after);
        }
        let blk = self.bm(i);
        blk.ptr = begin;
        blk.size = end - begin;
        blk.mapped = false;
        let prev = self.b(i).prev;
        self.try_merge(i, prev);
        let next = self.b(i).next;
        self.try_merge(i, next);
        self.insert_unmapped(i);
        self.reserved -= end - begin;
        self.counters.device_frees += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn power2_division_rounding_matches_the_source_comment() {
        // The source's example: 1200 with 4 divisions -> 1280.
        assert_eq!(roundup_power2_next_division(1200, 4), 1280);
        assert_eq!(roundup_power2_next_division(1024, 4), 1024);
        // 8 divisions of [1024, 2048) are 128 wide: 1100 -> 1152.
        assert_eq!(roundup_power2_next_division(1100, 8), 1152);
    }

    #[test]
    fn divisions_do_not_apply_at_or_below_512_times_divisions() {
        let c = AllocConf::parse("roundup_power2_divisions:4").unwrap();
        // 2000 <= 512 * 4 = 2048: plain rounding to 2048.
        assert_eq!(round_size(2000, &c), 2048);
        // 3000 > 2048: [2048, 4096) in steps of 512 -> 3072.
        assert_eq!(round_size(3000, &c), 3072);
        // 33 MiB + 1 in [32, 64) MiB in steps of 8 MiB -> 40 MiB.
        assert_eq!(round_size(33 * MIB + 1, &c), 40 * MIB);
    }

    #[test]
    fn pools_and_blocks_stay_consistent_after_churn() {
        let mut sim = Simulator::new(AllocConf::default(), None);
        let sizes = [700u64, 3 * MIB, 13 * MIB, 100, 900 * 1024, 25 * MIB];
        for (k, &s) in sizes.iter().cycle().take(60).enumerate() {
            sim.alloc(k as u64, s + k as u64, (k % 2) as u32).unwrap();
            if k % 3 == 2 {
                sim.free(k as u64 - 1).unwrap();
            }
        }
        let live: Vec<u64> = sim.live.iter().map(|(id, _)| id).collect();
        for id in live {
            sim.free(id).unwrap();
        }
        assert_eq!(sim.allocated, 0);
        // Every segment merged back into one free block.
        let free_blocks: usize = sim.pools.iter().map(|p| p.blocks.len()).sum();
        assert_eq!(free_blocks, sim.segments);
        let cached: u64 = sim
            .pools
            .iter()
            .flat_map(|p| p.blocks.keys())
            .map(|&k| key_size(k))
            .sum();
        assert_eq!(cached, sim.reserved);
    }
}
