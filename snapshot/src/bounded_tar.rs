//! A tar stream whose metadata entries are bounded before the `tar` crate reads them.
//!
//! The `tar` crate reads a PAX extended header (`x`, `g`) or a GNU long name or link (`L`, `K`)
//! into memory whole, whatever size its header claims: a layer can make rbuild allocate
//! gigabytes with a few hundred bytes. The crate has no option for a limit, so this reader
//! follows the stream's headers as the bytes pass and fails as soon as such an entry claims
//! more than [`MAX_META_ENTRY`] (the tar crate itself does the parsing; nothing here
//! interprets what it lets through).

use std::io::{self, Read};

/// The largest PAX header or GNU long name/link entry accepted (1 MiB: a path or a set of
/// xattrs far beyond what any filesystem takes).
pub const MAX_META_ENTRY: u64 = 1 << 20;

const BLOCK: usize = 512;

/// Wraps a tar stream (uncompressed) and refuses oversized metadata entries.
pub struct BoundedTar<R> {
    inner: R,
    /// The header block being collected.
    header: [u8; BLOCK],
    /// How much of it is in.
    filled: usize,
    /// Bytes of entry data (padded to blocks) still to pass before the next header.
    skip: u64,
    /// GNU sparse extension headers still to pass (each one block) before the data.
    extensions: bool,
}

impl<R> BoundedTar<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        BoundedTar {
            inner,
            header: [0; BLOCK],
            filled: 0,
            skip: 0,
            extensions: false,
        }
    }
}

/// The value of a tar numeric field: octal text, or base-256 when the top bit is set.
fn numeric(field: &[u8]) -> u64 {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        return field[1..].iter().fold(u64::from(field[0] & 0x7f), |n, b| {
            n.saturating_mul(256).saturating_add(u64::from(*b))
        });
    }
    field
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(*b))
        .fold(0u64, |n, b| {
            n.saturating_mul(8).saturating_add(u64::from(b - b'0'))
        })
}

impl<R: Read> BoundedTar<R> {
    /// Takes in one complete block (a header, or a GNU sparse extension).
    fn block(&mut self) -> io::Result<()> {
        let h = &self.header;
        if self.extensions {
            // A GNU sparse extension block: `isextended` at offset 504 says whether another follows.
            self.extensions = h[504] != 0;
            return Ok(());
        }
        if h.iter().all(|b| *b == 0) {
            return Ok(()); // end-of-archive blocks
        }
        let size = numeric(&h[124..136]);
        let kind = h[156];
        if matches!(kind, b'x' | b'g' | b'L' | b'K') && size > MAX_META_ENTRY {
            let what = if matches!(kind, b'x' | b'g') {
                "PAX extended header"
            } else {
                "GNU long name"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a {what} of {size} bytes, over the limit of {MAX_META_ENTRY}: refusing the layer"),
            ));
        }
        // Old GNU sparse files: `isextended` at 482 announces extension blocks before the data.
        self.extensions = kind == b'S' && h[482] != 0;
        self.skip = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        Ok(())
    }
}

impl<R: Read> Read for BoundedTar<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut data = &buf[..n];
        while !data.is_empty() {
            if self.skip > 0 {
                let k = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= k as u64;
                data = &data[k..];
                continue;
            }
            let k = (BLOCK - self.filled).min(data.len());
            self.header[self.filled..self.filled + k].copy_from_slice(&data[..k]);
            self.filled += k;
            data = &data[k..];
            if self.filled == BLOCK {
                self.filled = 0;
                self.block()?;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path("x").unwrap();
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    #[test]
    fn oversized_metadata_entries_are_refused_before_they_are_read() {
        for kind in [b'x', b'g', b'L', b'K'] {
            let h = header(kind, 1 << 31);
            let mut r = BoundedTar::new(&h[..]);
            let e = io::copy(&mut r, &mut io::sink()).unwrap_err();
            assert!(e.to_string().contains("over the limit of 1048576"), "{e}");
        }
    }

    #[test]
    fn ordinary_archives_pass_unchanged() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.user.x", b"y".as_slice())])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1000);
        h.set_mode(0o644);
        h.set_cksum();
        // A name too long for the header: a GNU long name entry before it.
        b.append_data(&mut h, "a-long-name/".repeat(20) + "f", &[7u8; 1000][..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let mut out = Vec::new();
        BoundedTar::new(&tar[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, tar);
        let mut a = tar::Archive::new(BoundedTar::new(&tar[..]));
        assert_eq!(
            a.entries().unwrap().count(),
            1,
            "the long name and PAX entries fold into one"
        );
    }
}
