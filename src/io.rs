//! File output that never leaves half a file behind, and the `.npy` array format.
//!
//! Every file `diffuse` writes goes through [`atomic_write`]: the bytes go to a temporary file
//! in the same directory, which is flushed and then renamed over the target, so an interrupted
//! run leaves either the old file or the new one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary sibling used while `path` is being written.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temp file + fsync + rename). Creates the parent
/// directory if needed.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp); // best effort: the error below is what matters
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::bad_input(path, format!("cannot serialise JSON: {e}")))?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}

/// Reads and parses a JSON file; parse errors name the file, line and column.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::bad_input(path, format!("invalid JSON: {e}")))
}

/// A dense array read from a `.npy` file, converted to f64, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// The values in C (row-major) order.
    pub data: Vec<f64>,
}

/// Encodes a little-endian f32 C-order `.npy` (format version 1.0).
pub fn npy_bytes_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let shape_str = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // magic (6) + version (2) + header length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes a float32 `.npy` atomically. `data.len()` must equal the product of `shape`.
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::param(
            "npy data",
            format!("shape {shape:?} holds {n} values, got {}", data.len()),
        ));
    }
    atomic_write(path, &npy_bytes_f32(shape, data))
}

/// Reads a `.npy` file of little-endian float32 or float64 (C order) into f64.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(&bytes).map_err(|msg| Error::bad_input(path, msg))
}

fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (missing the \\x93NUMPY magic)".into());
    }
    let (major, header_start) = (bytes[6], 8usize);
    let (header_len, data_start) = match major {
        1 => {
            let l = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            (l, header_start + 2)
        }
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            let l = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
            (l, header_start + 4)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let body_start = data_start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated .npy header")?;
    let header =
        std::str::from_utf8(&bytes[data_start..body_start]).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let k = header
            .find(&format!("'{key}'"))
            .ok_or(format!("the .npy header has no '{key}'"))?;
        Ok(header[k + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let width = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        let d: String = descr.chars().take(6).collect();
        return Err(format!(
            "dtype {d} is not supported, expected float32 ('<f4') or float64 ('<f8')"
        ));
    };
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order arrays are not supported; save with C order".into());
    }
    let shape_txt = field("shape")?;
    let close = shape_txt.find(')').ok_or("malformed shape in the .npy header")?;
    let shape: Vec<usize> = shape_txt[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("malformed shape entry '{s}'"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("shape overflows")?;
    let body = &bytes[body_start..];
    let need = n.checked_mul(width).ok_or("shape overflows")?;
    if body.len() != need {
        return Err(format!(
            "shape {shape:?} needs {need} bytes of data, the file has {}",
            body.len()
        ));
    }
    let data = if width == 4 {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    };
    Ok(NpyArray { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_header_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data = [1.0f32, -2.5, 3.25, 0.0, 7.0, 1e-3];
        write_npy_f32(&p, &[3, 2], &data).unwrap();
        let bytes = fs::read(&p).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let back = read_npy(&p).unwrap();
        assert_eq!(back.shape, vec![3, 2]);
        assert_eq!(back.data, data.iter().map(|&v| v as f64).collect::<Vec<_>>());
        // no temp file left behind
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn npy_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npy");
        fs::write(&p, b"hello").unwrap();
        assert!(read_npy(&p).unwrap_err().to_string().contains("magic"));
        let mut bytes = npy_bytes_f32(&[4], &[1.0, 2.0, 3.0, 4.0]);
        bytes.truncate(bytes.len() - 4);
        fs::write(&p, &bytes).unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(e.contains("needs 16 bytes") && e.contains("bad.npy"), "{e}");
        let mut bytes = npy_bytes_f32(&[1], &[1.0]);
        let pos = bytes.windows(3).position(|w| w == b"<f4").unwrap();
        bytes[pos + 1] = b'i';
        fs::write(&p, &bytes).unwrap();
        assert!(read_npy(&p).unwrap_err().to_string().contains("not supported"));
    }
}
