//! The caching allocator's configuration, parsed from a `PYTORCH_CUDA_ALLOC_CONF` string.
//!
//! Source: c10/core/AllocatorConfig.cpp (`AcceleratorAllocatorConfig::parseArgs` and its
//! `parse*` helpers, `roundup_power2_divisions(size)`), which PyTorch 2.11's CUDA allocator
//! reads through c10/cuda/CUDAAllocatorConfig.h. Only the keys that change how much device
//! memory the allocator reserves are modelled; keys that change host-side behaviour only
//! (lock release, pinned host memory) are accepted and ignored; everything else is refused
//! with an error that names the key. PyTorch itself skips unknown keys silently
//! (`ConfigTokenizer::skipKey`); refusing them here catches typos that would otherwise make a
//! simulation quietly differ from the run it stands for.

use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;
/// The flag the configuration comes from, named in every error.
const FIELD: &str = "--alloc-conf";
/// Number of power-of-two size intervals for `roundup_power2_divisions`: 1 MiB .. 64 GiB
/// (`kRoundUpPowerOfTwoIntervals` in c10/core/AllocatorConfig.cpp).
pub const ROUNDUP_INTERVALS: usize = 16;
/// Smallest `max_split_size_mb` and `max_non_split_rounding_mb` PyTorch accepts: kLargeBuffer
/// in MiB (`parseMaxSplitSize`, `parseMaxNonSplitRoundingSize`).
pub const MIN_SPLIT_MB: u64 = 20;

/// Keys accepted and ignored: they change host-side behaviour only, not reserved device bytes.
const IGNORED_KEYS: &[&str] = &[
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_num_register_threads",
    "pinned_use_background_threads",
    "pinned_reserve_segment_size_mb",
];
const ACCEPTED: &str = "comma-separated key:value pairs with keys max_split_size_mb, \
     max_non_split_rounding_mb, roundup_power2_divisions, expandable_segments, backend:native \
     (and the host-only keys release_lock_on_cudamalloc, pinned_*)";

/// Allocator settings that shape reserved memory. [`AllocConf::default`] is PyTorch's
/// behaviour with `PYTORCH_CUDA_ALLOC_CONF` unset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocConf {
    /// Cached blocks at least this large are never split, and serve only requests at least
    /// this large (`max_split_size_mb`, bytes; `u64::MAX` when unset, as in PyTorch).
    pub max_split_size: u64,
    /// An oversize request may take a cached oversize block at most this much larger
    /// (`max_non_split_rounding_mb`, bytes; default kLargeBuffer = 20 MiB).
    pub max_non_split_rounding_size: u64,
    /// Divisions per power-of-two interval, indexed by `floor(log2(size)) - 20` clamped to
    /// 0..16 (`roundup_power2_divisions`; 0 or 1 means plain 512-byte rounding).
    pub roundup_power2_divisions: [u64; ROUNDUP_INTERVALS],
    /// `expandable_segments:True`.
    pub expandable_segments: bool,
}

impl Default for AllocConf {
    fn default() -> Self {
        AllocConf {
            max_split_size: u64::MAX,
            max_non_split_rounding_size: 20 * MIB,
            roundup_power2_divisions: [0; ROUNDUP_INTERVALS],
            expandable_segments: false,
        }
    }
}

/// Splits like `ConfigTokenizer`: `,` `:` `[` `]` are tokens of their own, spaces vanish.
fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = String::new();
    for c in s.chars() {
        match c {
            ',' | ':' | '[' | ']' => {
                if !buf.is_empty() {
                    out.push(std::mem::take(&mut buf));
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {}
            c => buf.push(c),
        }
    }
    if !buf.is_empty() {
        out.push(buf);
    }
    out
}

struct Tokens<'a> {
    toks: Vec<String>,
    text: &'a str,
}

impl Tokens<'_> {
    fn get(&self, i: usize) -> Option<&str> {
        self.toks.get(i).map(String::as_str)
    }
    fn err(&self, got: impl std::fmt::Display, accepted: impl std::fmt::Display) -> Error {
        let _ = self.text;
        Error::invalid(FIELD, got, accepted)
    }
    fn expect(&self, i: usize, tok: &str, key: &str) -> Result<()> {
        match self.get(i) {
            Some(t) if t == tok => Ok(()),
            other => Err(self.err(
                format!(
                    "{key}{}",
                    other.map(|t| format!(" {t}")).unwrap_or_default()
                ),
                format!("'{tok}' after {key}"),
            )),
        }
    }
    fn size_t(&self, i: usize, key: &str) -> Result<u64> {
        let t = self.get(i).unwrap_or("");
        t.parse::<u64>().map_err(|_| {
            self.err(
                format!("{key}:{t}"),
                format!("a non-negative integer for {key}"),
            )
        })
    }
}

impl AllocConf {
    /// Parses a `PYTORCH_CUDA_ALLOC_CONF` string (`parseArgs`). The empty string is the
    /// default configuration.
    ///
    /// ```
    /// use memplan::allocator::AllocConf;
    /// let c = AllocConf::parse("max_split_size_mb:128,expandable_segments:True").unwrap();
    /// assert_eq!(c.max_split_size, 128 << 20);
    /// assert!(c.expandable_segments);
    /// assert!(AllocConf::parse("max_split_size_mb:10").is_err()); // below 20 MiB
    /// ```
    pub fn parse(text: &str) -> Result<AllocConf> {
        let t = Tokens {
            toks: tokenize(text),
            text,
        };
        let mut conf = AllocConf::default();
        let mut i = 0;
        while i < t.toks.len() {
            let key = t.toks[i].clone();
            match key.as_str() {
                "max_split_size_mb" | "max_non_split_rounding_mb" => {
                    t.expect(i + 1, ":", &key)?;
                    let mb = t.size_t(i + 2, &key)?;
                    if mb < MIN_SPLIT_MB {
                        return Err(t.err(
                            format!("{key}:{mb}"),
                            format!("{key} >= {MIN_SPLIT_MB} (PyTorch refuses smaller values)"),
                        ));
                    }
                    let bytes = mb.min(u64::MAX / MIB) * MIB;
                    if key == "max_split_size_mb" {
                        conf.max_split_size = bytes;
                    } else {
                        conf.max_non_split_rounding_size = bytes;
                    }
                    i += 3;
                }
                "roundup_power2_divisions" => {
                    t.expect(i + 1, ":", &key)?;
                    i = conf.parse_divisions(&t, i + 2)?;
                }
                "expandable_segments" => {
                    t.expect(i + 1, ":", &key)?;
                    conf.expandable_segments = match t.get(i + 2) {
                        Some("True") => true,
                        Some("False") => false,
                        other => {
                            return Err(t.err(
                                format!("expandable_segments:{}", other.unwrap_or("")),
                                "expandable_segments:True or expandable_segments:False",
                            ))
                        }
                    };
                    i += 3;
                }
                "garbage_collection_threshold" => {
                    return Err(t.err(
                        text,
                        "no garbage_collection_threshold: it acts only under a per-process \
                         memory fraction and is not simulated",
                    ))
                }
                "backend" => {
                    t.expect(i + 1, ":", &key)?;
                    if t.get(i + 2) != Some("native") {
                        return Err(t.err(
                            format!("backend:{}", t.get(i + 2).unwrap_or("")),
                            "backend:native (cudaMallocAsync is not simulated)",
                        ));
                    }
                    i += 3;
                }
                k if IGNORED_KEYS.contains(&k) => {
                    t.expect(i + 1, ":", &key)?;
                    if t.get(i + 2).is_none() {
                        return Err(t.err(format!("{key}:"), format!("a value for {key}")));
                    }
                    i += 3;
                }
                _ => return Err(t.err(key, ACCEPTED)),
            }
            // `parseArgs`: pairs are separated by commas.
            if i < t.toks.len() {
                t.expect(i, ",", t.toks[i - 1].as_str())?;
                i += 1;
            }
        }
        Ok(conf)
    }

    /// `parseRoundUpPower2Divisions`: either one power of two for every interval, or a list
    /// `[256:1,512:2,>:4]` of `boundary_mb:divisions` (boundaries powers of two; a value of 0
    /// or a power of two; the first entry also fills every interval below it; `>` fills every
    /// interval above the last boundary). Returns the index after the value.
    fn parse_divisions(&mut self, t: &Tokens, mut i: usize) -> Result<usize> {
        let key = "roundup_power2_divisions";
        if t.get(i) == Some("[") {
            let mut first = true;
            let mut last_index = 0usize;
            i += 1;
            loop {
                match t.get(i) {
                    Some("]") => return Ok(i + 1),
                    None => {
                        return Err(t.err(
                            format!("{key}:{}", &t.text),
                            "a closing ']' in roundup_power2_divisions",
                        ))
                    }
                    _ => {}
                }
                let boundary = t.get(i).unwrap_or("").to_string();
                t.expect(i + 1, ":", &boundary)?;
                let value = t.size_t(i + 2, key)?;
                if value != 0 && !value.is_power_of_two() {
                    return Err(t.err(
                        format!("{boundary}:{value}"),
                        "divisions that are 0 or a power of two",
                    ));
                }
                if boundary == ">" {
                    for d in self
                        .roundup_power2_divisions
                        .iter_mut()
                        .skip(last_index + 1)
                    {
                        *d = value;
                    }
                } else {
                    let b = t.size_t(i, key)?;
                    if !b.is_power_of_two() {
                        return Err(t.err(
                            format!("{b}:{value}"),
                            "interval boundaries (MiB) that are powers of two",
                        ));
                    }
                    let index = (b.ilog2() as usize).min(ROUNDUP_INTERVALS - 1);
                    if first {
                        for d in &mut self.roundup_power2_divisions[..index] {
                            *d = value;
                        }
                        first = false;
                    }
                    self.roundup_power2_divisions[index] = value;
                    last_index = index;
                }
                i += 3;
                if t.get(i) == Some(",") {
                    i += 1;
                }
            }
        } else {
            let value = t.size_t(i, key)?;
            if !value.is_power_of_two() {
                return Err(t.err(
                    format!("{key}:{value}"),
                    "roundup_power2_divisions that is a power of two",
                ));
            }
            self.roundup_power2_divisions = [value; ROUNDUP_INTERVALS];
            Ok(i + 1)
        }
    }

    /// Divisions that apply to a request of `size` bytes
    /// (`AcceleratorAllocatorConfig::roundup_power2_divisions(size)`): interval
    /// `floor(log2(size)) - 20`, clamped to 0..16.
    pub fn divisions_for(&self, size: u64) -> u64 {
        let log = 63 - size.max(1).leading_zeros() as usize;
        let index = log.saturating_sub(20).min(ROUNDUP_INTERVALS - 1);
        self.roundup_power2_divisions[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_default() {
        assert_eq!(AllocConf::parse("").unwrap(), AllocConf::default());
        assert_eq!(AllocConf::parse("  ").unwrap(), AllocConf::default());
    }

    #[test]
    fn divisions_list_fills_below_first_and_above_last() {
        // 256 MiB -> index 8, 512 -> 9; first value fills 0..8; '>' fills 10..16.
        let c = AllocConf::parse("roundup_power2_divisions:[256:1,512:2,>:4]").unwrap();
        let d = c.roundup_power2_divisions;
        assert_eq!(&d[..9], &[1; 9]);
        assert_eq!(d[9], 2);
        assert_eq!(&d[10..], &[4; 6]);
        assert_eq!(c.divisions_for(300 << 20), 1); // log2 = 28 -> index 8
        assert_eq!(c.divisions_for(600 << 20), 2); // log2 = 29 -> index 9
        assert_eq!(c.divisions_for(1 << 40), 4);
    }

    #[test]
    fn single_division_value_applies_everywhere() {
        let c = AllocConf::parse("roundup_power2_divisions:4").unwrap();
        assert_eq!(c.roundup_power2_divisions, [4; ROUNDUP_INTERVALS]);
        assert!(AllocConf::parse("roundup_power2_divisions:3").is_err());
        assert!(AllocConf::parse("roundup_power2_divisions:0").is_err());
    }

    #[test]
    fn host_only_keys_are_ignored() {
        let c = AllocConf::parse("release_lock_on_cudamalloc:True,backend:native").unwrap();
        assert_eq!(c, AllocConf::default());
    }
}
