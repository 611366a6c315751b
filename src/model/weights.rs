//! Reading a safetensors file one tensor at a time, without mapping or
//! loading the whole file: the encoder keeps its own layout of the weights
//! (transposed, fused, quantised), so a full copy in memory beside it would
//! double the start-up peak (multilingual-e5-small's word table alone is
//! 384 MB in f32). Large tables are read in slices of rows.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Deserialize;

/// Largest header we accept (real ones are a few tens of kilobytes).
const MAX_HEADER: u64 = 100 << 20;

/// Element types: the three we read, and the others' sizes (a checkpoint may
/// hold e.g. an I64 `position_ids` buffer we skip, but whose offsets we check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    U64,
    I32,
    U32,
    I16,
    U16,
    I8,
    U8,
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(other)]
    Other,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::Other => 0,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

pub struct WeightsFile {
    file: File,
    /// Offset of the data section (after the length and the JSON header).
    base: u64,
    tensors: HashMap<String, Entry>,
}

impl WeightsFile {
    pub fn open(path: &Path) -> Result<WeightsFile, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0).map_err(|e| format!("not a safetensors file (no header length): {e}"))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > len {
            return Err(format!("not a safetensors file: header length {n} does not fit the file's {len} bytes"));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8).map_err(|e| e.to_string())?;
        let mut raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| format!("not a safetensors header: {e}"))?;
        raw.remove("__metadata__");
        let base = 8 + n;
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, v) in raw {
            let e: Entry = serde_json::from_value(v).map_err(|e| format!("tensor `{name}` in the header: {e}"))?;
            let [start, end] = e.data_offsets;
            if e.dtype == Dtype::Other {
                // An element type we do not know: nothing to check, never read.
                tensors.insert(name, e);
                continue;
            }
            let want = e.shape.iter().try_fold(e.dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
            if start > end || base.checked_add(end).is_none_or(|x| x > len) || want != Some(end - start) {
                return Err(format!("tensor `{name}`: offsets {start}..{end} do not match its shape and the file"));
            }
            tensors.insert(name, e);
        }
        Ok(WeightsFile { file, base, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of a tensor, if present.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// A whole tensor in f32, checked against the shape the caller expects;
    /// read in slices of about 4 MB (no whole-tensor buffers beside the result).
    pub fn read(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>, String> {
        let row: usize = dims.iter().skip(1).product::<usize>().max(1);
        let mut out = Vec::with_capacity(dims.iter().product());
        self.read_rows(name, dims, (1 << 20) / row, |rows| out.extend_from_slice(rows))?;
        Ok(out)
    }

    /// A tensor in f32, `chunk_rows` rows (of its first dimension) at a time.
    pub fn read_rows(
        &self,
        name: &str,
        dims: &[usize],
        chunk_rows: usize,
        mut f: impl FnMut(&[f32]),
    ) -> Result<(), String> {
        let e = self.tensors.get(name).ok_or_else(|| format!("tensor `{name}` is missing"))?;
        if e.shape != dims {
            return Err(format!("tensor `{name}` has shape {:?}, expected {dims:?}", e.shape));
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(format!("tensor `{name}` is {:?}: only F32, F16 and BF16 weights are supported", e.dtype));
        }
        let size = e.dtype.size();
        let row: usize = dims.iter().skip(1).product::<usize>().max(1) * size;
        let rows = dims.first().copied().unwrap_or(1);
        let chunk = chunk_rows.clamp(1, rows.max(1));
        let (mut bytes, mut vals) = (vec![0u8; chunk * row], Vec::with_capacity(chunk * row / size));
        let mut at = 0;
        while at < rows {
            let take = chunk.min(rows - at);
            let buf = &mut bytes[..take * row];
            self.file
                .read_exact_at(buf, self.base + e.data_offsets[0] + (at * row) as u64)
                .map_err(|err| format!("tensor `{name}`: {err}"))?;
            vals.clear();
            match e.dtype {
                Dtype::F32 => vals.extend(buf.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                Dtype::F16 => vals.extend(buf.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
                Dtype::BF16 => vals.extend(
                    buf.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
                ),
                _ => unreachable!("refused above"),
            }
            f(&vals);
            at += take;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, header: &str, data: &[u8]) {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(data);
        std::fs::write(path, f).unwrap();
    }

    #[test]
    fn reads_f32_f16_and_bf16_in_slices_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let mut data = Vec::new();
        for v in [1.0f32, -2.0, 0.5, 4.0] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        for v in [1.5f32, -3.0] {
            data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        for v in [2.0f32, -0.25] {
            data.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
        }
        write(
            &p,
            r#"{"__metadata__":{"a":"b"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},
               "h":{"dtype":"F16","shape":[2],"data_offsets":[16,20]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[20,24]}}"#,
            &data,
        );
        let w = WeightsFile::open(&p).unwrap();
        assert_eq!(w.read("a", &[2, 2]).unwrap(), vec![1.0, -2.0, 0.5, 4.0]);
        let mut chunks = Vec::new();
        w.read_rows("a", &[2, 2], 1, |r| chunks.push(r.to_vec())).unwrap();
        assert_eq!(chunks, vec![vec![1.0, -2.0], vec![0.5, 4.0]]);
        assert_eq!(w.read("h", &[2]).unwrap(), vec![1.5, -3.0]);
        assert_eq!(w.read("b", &[2]).unwrap(), vec![2.0, -0.25]);
        assert!(w.read("a", &[4]).unwrap_err().contains("expected [4]"));
        assert!(w.read("zz", &[1]).unwrap_err().contains("`zz` is missing"));

        write(&p, r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,64]}}"#, &data);
        assert!(WeightsFile::open(&p).err().unwrap().contains("do not match"));
        std::fs::write(&p, [255u8; 12]).unwrap();
        assert!(WeightsFile::open(&p).err().unwrap().contains("header length"));
    }
}
