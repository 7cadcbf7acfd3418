//! gzip's block format for gzp, with one change: a block whose bytes look random is stored
//! (deflate's block type 0) instead of compressed.
//!
//! Why not gzp's own `Gzip`: it runs deflate on every block, and zlib-rs spends about 30 MB/s
//! per core searching random data for matches it does not find (a 512 MiB random file took
//! 8 s of CPU on each of 2 cores, 2026-12-07), where the machine copies and checksums at GB/s.
//! Layers of compressed archives, images, model weights or encrypted files are like that.
//! gzp decides nothing per block, but lets a format do the encoding ([`FormatSpec`]); this is
//! that format. Header, footer and checksum are gzp's `Gzip`'s, so the stream is still one
//! gzip member that every reader takes.
//!
//! The test is the block's order-0 entropy. At [`STORE_ABOVE_BITS`] bits per byte, Huffman
//! coding could save at most 0.25% of the block; deflate could then win only through repeats
//! within its 32 KiB window, which bytes this even rarely hold. The decision depends on the
//! block alone, so the blob's bytes, and its digest, are the same on every machine.

use bytes::Bytes;
use flate2::{Compress, Compression};
use gzp::check::Crc32;
use gzp::deflate::Gzip;
use gzp::{FormatSpec, GzpError};

/// Blocks whose order-0 entropy is at least this many bits per byte are stored.
pub(crate) const STORE_ABOVE_BITS: f64 = 7.98;

/// The largest stored block deflate allows (its LEN field is 16 bits).
const STORED_MAX: usize = 65_535;

/// gzip, with blocks that do not compress stored (see the module docs).
#[derive(Copy, Clone, Debug)]
pub(crate) struct GzipStoringRandom {
    gzip: Gzip,
}

impl FormatSpec for GzipStoringRandom {
    type C = Crc32;
    type Compressor = Compress;

    fn new() -> Self {
        Self { gzip: Gzip::new() }
    }

    fn needs_dict(&self) -> bool {
        self.gzip.needs_dict()
    }

    fn create_compressor(&self, level: Compression) -> Result<Compress, GzpError> {
        self.gzip.create_compressor(level)
    }

    fn encode(
        &self,
        input: &[u8],
        encoder: &mut Compress,
        level: Compression,
        dict: Option<&Bytes>,
        is_last: bool,
    ) -> Result<Vec<u8>, GzpError> {
        if level.level() > 0 && !input.is_empty() && entropy_bits(input) >= STORE_ABOVE_BITS {
            return Ok(stored(input, is_last));
        }
        self.gzip.encode(input, encoder, level, dict, is_last)
    }

    fn header(&self, level: Compression) -> Vec<u8> {
        self.gzip.header(level)
    }

    fn footer(&self, check: &Crc32) -> Vec<u8> {
        self.gzip.footer(check)
    }
}

/// `input` as deflate stored blocks. Every block of gzp's stream starts on a byte boundary
/// (the one before it ended with a sync flush), so each stored block's three header bits
/// take a byte of their own.
fn stored(input: &[u8], is_last: bool) -> Vec<u8> {
    let chunks = input.len().div_ceil(STORED_MAX).max(1);
    let mut out = Vec::with_capacity(input.len() + 5 * chunks);
    let mut rest = input;
    loop {
        let n = rest.len().min(STORED_MAX);
        let (chunk, tail) = rest.split_at(n);
        let final_block = is_last && tail.is_empty();
        out.push(u8::from(final_block));
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&(!(n as u16)).to_le_bytes());
        out.extend_from_slice(chunk);
        rest = tail;
        if rest.is_empty() {
            return out;
        }
    }
}

/// Shannon entropy of the bytes of `data`, in bits per byte.
pub(crate) fn entropy_bits(data: &[u8]) -> f64 {
    // Four tables, so that runs of one byte value do not serialize on one counter.
    let mut counts = [[0u32; 256]; 4];
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        counts[0][q[0] as usize] += 1;
        counts[1][q[1] as usize] += 1;
        counts[2][q[2] as usize] += 1;
        counts[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        counts[0][b as usize] += 1;
    }
    let n = data.len() as f64;
    let mut bits = 0.0;
    let [a, b, c, d] = &counts;
    for (((a, b), c), d) in a.iter().zip(b).zip(c).zip(d) {
        let c = a + b + c + d;
        if c > 0 {
            let p = f64::from(c) / n;
            bits -= p * p.log2();
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use gzp::par::compress::ParCompressBuilder;
    use gzp::ZWriter;
    use std::io::{Read, Write};

    /// A xorshift stream: bytes that look random, without a dependency.
    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn gzip(data: &[u8], threads: usize) -> Vec<u8> {
        let mut enc = ParCompressBuilder::<GzipStoringRandom>::new()
            .num_threads(threads)
            .unwrap()
            .compression_level(Compression::new(6))
            .from_writer(Vec::new());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn random_bytes_are_stored_and_read_back() {
        let data = random(1_000_003, 7);
        assert!(entropy_bits(&data) >= STORE_ABOVE_BITS);
        let gz = gzip(&data, 2);
        assert_eq!(gunzip(&gz), data);
        // Stored: 5 bytes per 64 KiB, plus gzip's 18 and gzp's per-block sync markers.
        assert!(
            gz.len() < data.len() + data.len() / 1000 + 64,
            "{}",
            gz.len()
        );
    }

    #[test]
    fn text_is_still_compressed() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i} of a layer that compresses\n").into_bytes())
            .collect();
        assert!(entropy_bits(&text) < STORE_ABOVE_BITS);
        let gz = gzip(&text, 2);
        assert_eq!(gunzip(&gz), text);
        assert!(gz.len() < text.len() / 4, "{}", gz.len());
    }

    #[test]
    fn mixed_blocks_and_edge_sizes_read_back_the_same_on_any_thread_count() {
        for len in [0, 1, STORED_MAX, STORED_MAX + 1, 131_072, 131_073, 400_000] {
            let mut data = random(len, len as u64 + 1);
            // A compressible stretch in the middle, so both kinds of block meet.
            let mid = len / 3;
            for b in data.iter_mut().skip(mid).take(len / 3) {
                *b = b'a';
            }
            let one = gzip(&data, 1);
            assert_eq!(gunzip(&one), data, "len {len}");
            assert_eq!(gzip(&data, 2), one, "len {len}: bytes depend on threads");
        }
    }

    #[test]
    fn entropy_of_known_distributions() {
        assert_eq!(entropy_bits(&[5; 1000]), 0.0);
        let two: Vec<u8> = (0..1000).map(|i| (i % 2) as u8).collect();
        assert!((entropy_bits(&two) - 1.0).abs() < 1e-9);
        let all: Vec<u8> = (0..=255u8).cycle().take(256 * 40).collect();
        assert!((entropy_bits(&all) - 8.0).abs() < 1e-9);
    }
}
