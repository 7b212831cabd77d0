//! The entries of an image layout tar, listed without reading their data: the tar headers are
//! walked (seeking past each entry's data) and a truncated, sparse or oversized archive is
//! refused naming the entry. `regcache import` reads entries by their [`Span`];
//! `regcache export` lists an old archive to append to it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::AirgapError;
use crate::oci::MAX_MANIFEST_BYTES;

/// Where an entry's data lies in the archive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

impl Span {
    /// The offset just past the entry's data.
    pub(crate) fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}

pub(crate) fn entry_error(entry: &str, reason: impl std::fmt::Display) -> AirgapError {
    AirgapError::Entry {
        entry: entry.to_owned(),
        reason: reason.to_string(),
    }
}

/// The largest GNU long-name (`L`) or long-link (`K`) entry, and the largest PAX extended
/// header (`x`, `g`), an archive may hold. The names of an image layout are short
/// (`blobs/sha256/<64 hex>`), and `tar` 0.4 reads these entries whole whatever size they
/// declare, so the listing walks the headers itself and checks the size before reading.
const MAX_EXTENSION_BYTES: u64 = 64 * 1024;

/// The most headers an archive may hold: far more than an image layout has (one per blob),
/// few enough that the listing stays small.
const MAX_ENTRIES: usize = 1 << 18;

/// Names longer than this are not listed: no entry an import reads has one
/// (`blobs/sha512/<128 hex>` is the longest), so the listing keeps short keys only.
const MAX_LISTED_NAME: usize = 256;

/// A tar block: headers are one, data is padded to a multiple.
const BLOCK: u64 = 512;

/// Lists the archive's regular files, seeking past their data. A data span past the end of the
/// file (truncation), an unreadable header or an oversized extension entry is an error naming
/// the entry.
pub(crate) fn list_entries(path: &Path) -> Result<HashMap<String, Span>, AirgapError> {
    let open_err = |source| AirgapError::ReadList {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_err)?;
    let file_len = file.metadata().map_err(open_err)?.len();
    read_entries(file, file_len)
}

/// The listing of [`list_entries`] over any seekable archive of `len` bytes (the fuzz target
/// lists archives in memory). Headers are read here, 512 bytes at a time, and parsed with
/// `tar::Header`; GNU long names and PAX records are applied as the `tar` crate and Go's
/// `archive/tar` apply them (a PAX `size` included), after their size was checked. Sparse
/// entries are refused: an image layout has none, and their bytes are not where they lie.
pub(crate) fn read_entries(
    mut reader: impl Read + Seek,
    len: u64,
) -> Result<HashMap<String, Span>, AirgapError> {
    let mut entries = HashMap::new();
    let mut extensions = Extensions::default();
    let mut previous = String::from("(start of archive)");
    let mut position = 0;
    for _ in 0..=MAX_ENTRIES {
        let Some(header) = read_header(&mut reader, position)
            .map_err(|e| entry_error(&format!("after {previous}"), e))?
        else {
            if extensions.is_empty() {
                return Ok(entries);
            }
            return Err(entry_error(
                &previous,
                "describes an entry the archive lacks",
            ));
        };
        let kind = header.entry_type();
        let data = position + BLOCK;
        if let Some(what) = extension_kind(kind) {
            let label = format!("{} ({what})", String::from_utf8_lossy(&header.path_bytes()));
            let size = header.entry_size().map_err(|e| entry_error(&label, e))?;
            if size > MAX_EXTENSION_BYTES {
                return Err(entry_error(
                    &label,
                    format!("declares {size} bytes; at most {MAX_EXTENSION_BYTES} are accepted"),
                ));
            }
            check_within(data, size, len, &label)?;
            if kind.is_gnu_longname() || kind.is_pax_local_extensions() {
                let mut bytes = vec![0; usize::try_from(size).unwrap_or(0)];
                reader
                    .read_exact(&mut bytes)
                    .map_err(|e| entry_error(&label, e))?;
                extensions
                    .add(kind, bytes)
                    .map_err(|reason| entry_error(&label, reason))?;
            }
            position = next_header(data, size).map_err(|reason| entry_error(&label, reason))?;
            previous = label;
            continue;
        }
        let header_name = String::from_utf8_lossy(&header.path_bytes()).into_owned();
        let (name, size) = std::mem::take(&mut extensions)
            .apply(&header)
            .map_err(|reason| entry_error(&header_name, reason))?;
        if kind.is_gnu_sparse() {
            let declared = header.as_gnu().and_then(|gnu| gnu.real_size().ok());
            return Err(entry_error(
                &name,
                format!(
                    "a sparse entry (declaring {} bytes): not accepted in an image layout",
                    declared.unwrap_or(size)
                ),
            ));
        }
        check_within(data, size, len, &name)?;
        if kind.is_file() && name.len() <= MAX_LISTED_NAME {
            entries.insert(name.clone(), Span { offset: data, size });
        }
        position = next_header(data, size).map_err(|reason| entry_error(&name, reason))?;
        previous = name;
    }
    Err(entry_error(
        &format!("after {previous}"),
        format!("more than {MAX_ENTRIES} entries"),
    ))
}

/// The header at `position`; `None` at the end of the archive (end of file, or a zero block).
fn read_header(
    reader: &mut (impl Read + Seek),
    position: u64,
) -> Result<Option<tar::Header>, std::io::Error> {
    reader.seek(SeekFrom::Start(position))?;
    let mut header = tar::Header::new_old();
    let block = header.as_mut_bytes();
    let mut filled = 0;
    while filled < block.len() {
        match reader.read(&mut block[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::other("the archive ends inside a header")),
            Ok(read) => filled += read,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    if block.iter().all(|byte| *byte == 0) {
        return Ok(None);
    }
    // The checksum counts its own field as spaces (unsigned bytes, as `tar` and Go write it).
    let sum = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|byte| u32::from(*byte))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    if header.cksum()? != sum {
        return Err(std::io::Error::other("header checksum mismatch"));
    }
    Ok(Some(header))
}

/// What an extension entry is, `None` for an entry of its own.
fn extension_kind(kind: tar::EntryType) -> Option<&'static str> {
    if kind.is_gnu_longname() {
        Some("GNU long name")
    } else if kind.is_gnu_longlink() {
        Some("GNU long link")
    } else if kind.is_pax_local_extensions() {
        Some("PAX header")
    } else if kind.is_pax_global_extensions() {
        Some("PAX global header")
    } else {
        None
    }
}

/// Refuses data running past the end of the archive (truncation).
fn check_within(data: u64, size: u64, len: u64, entry: &str) -> Result<(), AirgapError> {
    if data.saturating_add(size) > len {
        return Err(entry_error(entry, "truncated: the archive ends inside it"));
    }
    Ok(())
}

/// Where the header after data of `size` bytes at `data` lies (data is padded to blocks).
fn next_header(data: u64, size: u64) -> Result<u64, &'static str> {
    size.checked_next_multiple_of(BLOCK)
        .and_then(|padded| data.checked_add(padded))
        .ok_or("size overflow")
}

/// The GNU long name and PAX records read since the last entry: they describe the next one.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.pax.is_none()
    }

    fn add(&mut self, kind: tar::EntryType, bytes: Vec<u8>) -> Result<(), &'static str> {
        let slot = if kind.is_gnu_longname() {
            &mut self.long_name
        } else {
            &mut self.pax
        };
        if slot.replace(bytes).is_some() {
            return Err("a second extension of its kind for one entry");
        }
        Ok(())
    }

    /// The name and data size of the entry with `header`: a PAX `path` or GNU long name (both
    /// at once is ambiguous: tools disagree on which wins) or the header's, and a PAX `size` or
    /// the header's.
    fn apply(self, header: &tar::Header) -> Result<(String, u64), String> {
        let mut pax_path = None;
        let mut pax_size = None;
        for record in tar::PaxExtensions::new(self.pax.as_deref().unwrap_or_default()) {
            let record = record.map_err(|_| "a malformed PAX record".to_owned())?;
            match record.key_bytes() {
                b"path" => pax_path = Some(record.value_bytes().to_vec()),
                b"size" => {
                    let size = record.value().ok().and_then(|v| v.parse::<u64>().ok());
                    pax_size = Some(size.ok_or("a PAX size that is not a number")?);
                }
                key if key.starts_with(b"GNU.sparse.") => {
                    return Err("a PAX sparse entry: not accepted in an image layout".to_owned())
                }
                _ => {}
            }
        }
        let name = match (self.long_name, pax_path) {
            (Some(_), Some(_)) => return Err("both a GNU long name and a PAX path".to_owned()),
            (Some(mut long_name), None) => {
                while long_name.last() == Some(&0) {
                    long_name.pop();
                }
                long_name
            }
            (None, Some(path)) => path,
            (None, None) => header.path_bytes().into_owned(),
        };
        let size = match pax_size {
            Some(size) => size,
            None => header.entry_size().map_err(|e| e.to_string())?,
        };
        let name = String::from_utf8_lossy(&name);
        Ok((name.trim_start_matches("./").to_owned(), size))
    }
}

/// Reads an entry's data.
pub(crate) fn open_entry(path: &Path, span: Span) -> Result<impl Read, std::io::Error> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(span.offset))?;
    Ok(file.take(span.size))
}

/// Reads a small entry whole (`index.json`, manifests).
pub(crate) fn read_small(path: &Path, name: &str, span: Span) -> Result<Vec<u8>, AirgapError> {
    if span.size > MAX_MANIFEST_BYTES as u64 {
        return Err(entry_error(name, "too large for a manifest"));
    }
    let mut bytes = Vec::new();
    open_entry(path, span)
        .and_then(|mut reader| reader.read_to_end(&mut bytes))
        .map_err(|e| entry_error(name, e))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(archive: &[u8]) -> Result<HashMap<String, Span>, AirgapError> {
        read_entries(std::io::Cursor::new(archive), archive.len() as u64)
    }

    #[track_caller]
    fn check_refused(archive: &[u8], expected: &[&str]) {
        let message = listed(archive).expect_err("refused").to_string();
        for part in expected {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }

    fn regular(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, name, data)
            .expect("append");
    }

    /// Appends a header of `kind` declaring `size` bytes, then `data`, padded to a block.
    fn raw_entry(out: &mut Vec<u8>, kind: tar::EntryType, name: &str, size: u64, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        // Written as given (`set_path` would drop the `./` of `././@LongLink`).
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }

    fn span_data<'a>(archive: &'a [u8], entries: &HashMap<String, Span>, name: &str) -> &'a [u8] {
        let span = entries[name];
        &archive[span.offset as usize..span.end() as usize]
    }

    #[test]
    fn long_names_and_pax_records_are_applied() {
        let long = format!("blobs/{}/x", "a".repeat(150));
        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::Regular,
            "./oci-layout",
            2,
            b"{}",
        );
        let mut long_name = long.clone().into_bytes();
        long_name.push(0);
        let size = long_name.len() as u64;
        raw_entry(
            &mut archive,
            tar::EntryType::GNULongName,
            "././@LongLink",
            size,
            &long_name,
        );
        raw_entry(
            &mut archive,
            tar::EntryType::Regular,
            "blobs/aaa",
            4,
            b"long",
        );
        // A PAX size overrides the header's (as in `tar` and Go): the header says 0.
        raw_entry(
            &mut archive,
            tar::EntryType::XHeader,
            "PaxHeaders/index.json",
            30,
            b"19 path=index.json\n11 size=12\n",
        );
        raw_entry(
            &mut archive,
            tar::EntryType::Regular,
            "x",
            0,
            b"{\"a\":\"pax\"}\n",
        );
        raw_entry(&mut archive, tar::EntryType::Regular, "after", 5, b"after");
        raw_entry(&mut archive, tar::EntryType::Directory, "blobs/", 0, b"");
        archive.extend_from_slice(&[0; 1024]);
        let entries = listed(&archive).expect("listed");
        assert_eq!(span_data(&archive, &entries, "oci-layout"), b"{}");
        assert_eq!(span_data(&archive, &entries, &long), b"long");
        assert_eq!(
            span_data(&archive, &entries, "index.json"),
            b"{\"a\":\"pax\"}\n"
        );
        assert_eq!(span_data(&archive, &entries, "after"), b"after");
        assert_eq!(entries.len(), 4, "{:?}", entries.keys());

        // An archive `tar` writes lists the same.
        let mut builder = tar::Builder::new(Vec::new());
        regular(&mut builder, &long, b"long");
        let written = builder.into_inner().expect("archive");
        let entries = listed(&written).expect("listed");
        assert_eq!(span_data(&written, &entries, &long), b"long");
    }

    #[test]
    fn oversized_extension_entries_are_refused_before_they_are_read() {
        // 256 MiB declared, a few KiB present: refused by the declared size, not truncation.
        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::GNULongName,
            "././@LongLink",
            256 << 20,
            &[b'a'; 8192],
        );
        check_refused(&archive, &["././@LongLink (GNU long name)", "268435456"]);
        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::XHeader,
            "PaxHeaders/x",
            1 << 40,
            b"",
        );
        check_refused(&archive, &["PaxHeaders/x (PAX header)", "at most 65536"]);
        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::XGlobalHeader,
            "g",
            65537,
            &[b'a'; 65537],
        );
        check_refused(&archive, &["PAX global header"]);
        let mut archive = Vec::new();
        raw_entry(&mut archive, tar::EntryType::GNULongLink, "k", 1 << 30, b"");
        check_refused(&archive, &["GNU long link"]);
    }

    #[test]
    fn sparse_ambiguous_and_truncated_entries_are_refused() {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNUSparse);
        header.set_path("blobs/sha256/sparse").expect("path");
        header.set_size(0);
        if let Some(gnu) = header.as_gnu_mut() {
            gnu.set_real_size(2 << 30);
        }
        header.set_cksum();
        check_refused(
            header.as_bytes(),
            &["blobs/sha256/sparse", "sparse", "2147483648"],
        );

        let mut archive = Vec::new();
        let pax = b"34 GNU.sparse.realsize=2147483648\n";
        raw_entry(
            &mut archive,
            tar::EntryType::XHeader,
            "p",
            pax.len() as u64,
            pax,
        );
        raw_entry(&mut archive, tar::EntryType::Regular, "blobs/x", 0, b"");
        check_refused(&archive, &["blobs/x", "sparse"]);

        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::GNULongName,
            "././@LongLink",
            3,
            b"ab\0",
        );
        raw_entry(
            &mut archive,
            tar::EntryType::XHeader,
            "p",
            10,
            b"10 path=c\n",
        );
        raw_entry(&mut archive, tar::EntryType::Regular, "x", 0, b"");
        check_refused(&archive, &["both a GNU long name and a PAX path"]);

        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::GNULongName,
            "././@LongLink",
            2,
            b"ab",
        );
        raw_entry(
            &mut archive,
            tar::EntryType::GNULongName,
            "././@LongLink",
            2,
            b"cd",
        );
        check_refused(&archive, &["a second extension"]);

        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::GNULongName,
            "././@LongLink",
            2,
            b"ab",
        );
        check_refused(&archive, &["describes an entry the archive lacks"]);

        let mut archive = Vec::new();
        raw_entry(
            &mut archive,
            tar::EntryType::Regular,
            "blobs/big",
            4096,
            b"",
        );
        check_refused(&archive, &["blobs/big", "truncated"]);

        let mut archive = Vec::new();
        raw_entry(&mut archive, tar::EntryType::Regular, "a", 0, b"");
        archive[0] ^= 1;
        check_refused(&archive, &["checksum"]);
    }
}
