//! Recognising files that are read whole once their index is read: model and array formats.
//!
//! A model load does not look like a download to a reader that only watches offsets. A
//! safetensors load reads the header at offset 0 (an 8-byte little-endian length, then that many
//! bytes of JSON), then copies every tensor out of an `mmap` of the file: page faults that reach
//! the daemon as many concurrent reads, in the order the loader walks its tensors, which may be
//! neither the file's order nor one stream. GGUF (`llama.cpp`), NumPy's `.npy` and PyTorch's
//! `.pt` zip archives (whose central directory is at the end: the loader reads the tail first,
//! then the records from the start) have the same shape: an index, then all of the data.
//!
//! What they share is the first bytes of the file, which the first read at offset 0 brings
//! anyway: [`index_first`] looks at them (no extra request, no guess from the file name, which
//! says nothing about what an application will do with it) and names the format. The reader then
//! fetches the whole file in order, ahead of the faults (see the sweep in the module above).

/// A format whose readers read the whole file once they have read its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexFirst {
    /// `u64` header length (little-endian), then a JSON header of that length, then the tensors.
    Safetensors,
    /// `GGUF` magic and a version, then metadata and tensor infos, then the tensors.
    Gguf,
    /// A zip archive (PyTorch `.pt`/`.pth`, `.npz`): local header `PK\x03\x04` at offset 0.
    Zip,
    /// `\x93NUMPY` magic, then a header, then one array.
    Npy,
}

/// The longest safetensors header the format allows (the reference implementation refuses more).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// The format whose index starts `first` (the first bytes of an object of `size` bytes), if any.
/// `first` is what the first read at offset 0 returned: at least 8 bytes tell a safetensors
/// header (a read through the page cache brings a whole page, so the JSON's `{` too).
pub fn index_first(first: &[u8], size: u64) -> Option<IndexFirst> {
    if first.len() >= 8 {
        let header = u64::from_le_bytes(first[..8].try_into().ok()?);
        let plausible = (2..=MAX_SAFETENSORS_HEADER).contains(&header) && 8 + header <= size;
        if plausible && first.get(8).is_none_or(|b| *b == b'{') {
            return Some(IndexFirst::Safetensors);
        }
    }
    if first.len() >= 8 && &first[..4] == b"GGUF" {
        let version = u32::from_le_bytes(first[4..8].try_into().ok()?);
        if (1..=3).contains(&version) {
            return Some(IndexFirst::Gguf);
        }
    }
    if first.starts_with(b"PK\x03\x04") {
        return Some(IndexFirst::Zip);
    }
    if first.starts_with(b"\x93NUMPY") {
        return Some(IndexFirst::Npy);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data, 7);
        v
    }

    #[test]
    fn recognises_index_first_formats_by_their_first_bytes() {
        let st = safetensors(
            r#"{"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}"#,
            8,
        );
        let size = st.len() as u64;
        assert_eq!(index_first(&st, size), Some(IndexFirst::Safetensors));
        // The 8-byte length alone (an application's own `pread` of 8 bytes).
        assert_eq!(index_first(&st[..8], size), Some(IndexFirst::Safetensors));
        // A header longer than the object is not one.
        assert_eq!(index_first(&st, 20), None);
        let mut gguf = b"GGUF".to_vec();
        gguf.extend_from_slice(&3u32.to_le_bytes());
        gguf.extend_from_slice(&[0; 16]);
        assert_eq!(index_first(&gguf, 1 << 30), Some(IndexFirst::Gguf));
        assert_eq!(
            index_first(b"PK\x03\x04\x14\x00\x00\x00", 1 << 30),
            Some(IndexFirst::Zip)
        );
        assert_eq!(
            index_first(b"\x93NUMPY\x01\x00v\x00{'descr'", 1 << 30),
            Some(IndexFirst::Npy)
        );
    }

    #[test]
    fn other_files_are_not_recognised() {
        for first in [
            &b"hello world, this is text"[..],
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
            b"GGUF\xff\xff\xff\xff",
            b"{\"json\": true}",
            &[0u8; 4096][..],
            b"",
            b"PK",
        ] {
            assert_eq!(index_first(first, 1 << 30), None, "{first:?}");
        }
    }
}
