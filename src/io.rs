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
pub fn temp_path(path: &Path) -> PathBuf {
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
            fs::create_dir_all(parent).map_err(|e| {
                if parent.exists() && !parent.is_dir() {
                    Error::bad_input(parent, "exists and is not a directory (an output's folder)")
                } else {
                    Error::io(parent, e)
                }
            })?;
        }
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        f.write_all(head)?;
        crate::train::checkpoint::test_pause(&format!(
            "partial {}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        f.write_all(tail)?;
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
    let text = read_text(path)?;
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

impl NpyArray {
    /// The multi-index of the value at `flat` (C order) in this array's shape.
    pub fn unravel(&self, flat: usize) -> Vec<usize> {
        let mut rest = flat;
        let mut index = vec![0; self.shape.len()];
        for (k, &d) in self.shape.iter().enumerate().rev() {
            if d > 0 {
                index[k] = rest % d;
                rest /= d;
            }
        }
        index
    }

    /// An error naming `path` and the first value that is NaN or infinite, if any: user data
    /// with non-finite values is bad input, found when the file is read.
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::bad_input(
                path,
                format!(
                    "the value at index {:?} (element {i} in C order) is {}; values must be finite",
                    self.unravel(i),
                    self.data[i]
                ),
            )),
        }
    }
}

/// Reads a `.npy` file of little-endian float32 or float64 (C order) into f64.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    npy_from_bytes(&bytes, path)
}

/// [`read_npy`], then an error naming the file and the first non-finite value's index if there
/// is one ([`NpyArray::check_finite`]): for user data such as `--init-noise` arrays and samples.
pub fn read_npy_finite(path: &Path) -> Result<NpyArray> {
    let a = read_npy(path)?;
    a.check_finite(path)?;
    Ok(a)
}

/// Parses the bytes of a `.npy` file (as [`read_npy`] does); errors name `path`.
pub fn npy_from_bytes(bytes: &[u8], path: &Path) -> Result<NpyArray> {
    parse_npy(bytes).map_err(|msg| Error::bad_input(path, msg))
}

/// Reads a text file (UTF-8); a file that is not UTF-8 is bad input naming the byte offset.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::bad_input(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// A value of the `.npy` header's Python dict literal.
#[derive(Debug, PartialEq)]
enum HeaderValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<String>),
}

/// Parses the header `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }`: a dict of
/// quoted keys to strings, booleans or tuples of integers (what `numpy.lib.format` writes).
fn parse_header_dict(text: &str) -> std::result::Result<Vec<(String, HeaderValue)>, String> {
    let mut chars = text.trim().chars().peekable();
    let malformed = |what: &str| format!("malformed .npy header ({what}): {}", shorten(text));
    let skip_ws = |c: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while c.peek().is_some_and(|ch| ch.is_whitespace()) {
            c.next();
        }
    };
    let quoted = |c: &mut std::iter::Peekable<std::str::Chars<'_>>| -> Option<String> {
        let q = c.next().filter(|&q| q == '\'' || q == '"')?;
        let mut out = String::new();
        for ch in c.by_ref() {
            if ch == q {
                return Some(out);
            }
            out.push(ch);
        }
        None
    };
    if chars.next() != Some('{') {
        return Err(malformed("expected '{'"));
    }
    let mut entries = Vec::new();
    loop {
        skip_ws(&mut chars);
        if chars.peek() == Some(&'}') {
            chars.next();
            break;
        }
        let key = quoted(&mut chars).ok_or_else(|| malformed("expected a quoted key"))?;
        skip_ws(&mut chars);
        if chars.next() != Some(':') {
            return Err(malformed("expected ':' after a key"));
        }
        skip_ws(&mut chars);
        let value = match chars.peek() {
            Some('\'') | Some('"') => {
                HeaderValue::Str(quoted(&mut chars).ok_or_else(|| malformed("unterminated string"))?)
            }
            Some('(') => {
                chars.next();
                let mut items = Vec::new();
                let mut item = String::new();
                loop {
                    match chars.next() {
                        Some(')') => break,
                        Some(',') => items.push(std::mem::take(&mut item)),
                        Some(ch) => item.push(ch),
                        None => return Err(malformed("unterminated tuple")),
                    }
                }
                items.push(item);
                let items: Vec<String> = items
                    .into_iter()
                    .map(|i| i.trim().to_string())
                    .filter(|i| !i.is_empty())
                    .collect();
                HeaderValue::Tuple(items)
            }
            _ => {
                let word: String =
                    std::iter::from_fn(|| chars.next_if(|ch| ch.is_ascii_alphabetic())).collect();
                match word.as_str() {
                    "True" => HeaderValue::Bool(true),
                    "False" => HeaderValue::Bool(false),
                    _ => return Err(malformed("expected a string, True/False or a tuple")),
                }
            }
        };
        entries.push((key, value));
        skip_ws(&mut chars);
        match chars.next() {
            Some(',') => {}
            Some('}') => break,
            _ => return Err(malformed("expected ',' or '}'")),
        }
    }
    skip_ws(&mut chars);
    if chars.next().is_some() {
        return Err(malformed("text after the closing '}'"));
    }
    Ok(entries)
}

/// The first 80 characters of `text` on one line (control characters escaped), for messages.
fn shorten(text: &str) -> String {
    let t: String = text.trim().escape_debug().collect();
    if t.chars().count() > 80 {
        format!("{}...", t.chars().take(77).collect::<String>())
    } else {
        t
    }
}

/// Parses a `.npy` file: the magic, a version 1 (2-byte header length) or 2/3 (4-byte) header,
/// the header dict, then exactly `prod(shape) * itemsize` bytes of data. Every size is checked
/// (with checked arithmetic) against the bytes actually present before anything is allocated.
fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (missing the \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (header_len, data_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or("truncated .npy header")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12usize)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let body_start = data_start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            format!(
                "truncated .npy header: it declares {header_len} bytes, the file has {} after the preamble",
                bytes.len() - data_start.min(bytes.len())
            )
        })?;
    let header =
        std::str::from_utf8(&bytes[data_start..body_start]).map_err(|_| "the .npy header is not text")?;
    let entries = parse_header_dict(header)?;
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or(format!("the .npy header has no '{key}'"))
    };
    if let Some((k, _)) = entries
        .iter()
        .find(|(k, _)| !["descr", "fortran_order", "shape"].contains(&k.as_str()))
    {
        return Err(format!(
            "the .npy header has an unknown key '{}' (expected descr, fortran_order, shape)",
            shorten(k)
        ));
    }
    let (width, little): (usize, bool) = match get("descr")? {
        HeaderValue::Str(d) if d == "<f4" => (4, true),
        HeaderValue::Str(d) if d == "<f8" => (8, true),
        HeaderValue::Str(d) if d == ">f4" => (4, false),
        HeaderValue::Str(d) if d == ">f8" => (8, false),
        HeaderValue::Str(d) => {
            return Err(format!(
                "dtype '{}' is not supported, expected float32 ('<f4') or float64 ('<f8')",
                shorten(d)
            ))
        }
        _ => return Err("the .npy header's 'descr' is not a string".into()),
    };
    match get("fortran_order")? {
        HeaderValue::Bool(false) => {}
        HeaderValue::Bool(true) => {
            return Err("Fortran-order arrays are not supported; save with C order".into())
        }
        _ => return Err("the .npy header's 'fortran_order' is not True or False".into()),
    }
    let shape: Vec<usize> = match get("shape")? {
        HeaderValue::Tuple(items) => items
            .iter()
            .map(|s| {
                s.parse::<usize>()
                    .map_err(|_| format!("malformed shape entry '{}'", shorten(s)))
            })
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err("the .npy header's 'shape' is not a tuple".into()),
    };
    let body = &bytes[body_start..];
    let need = shape
        .iter()
        .try_fold(width, |acc: usize, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if body.len() != need {
        return Err(format!(
            "shape {shape:?} needs {need} bytes of data, the file has {}",
            body.len()
        ));
    }
    let data = if width == 4 {
        body.chunks_exact(4)
            .map(|c| {
                let b = [c[0], c[1], c[2], c[3]];
                (if little {
                    f32::from_le_bytes(b)
                } else {
                    f32::from_be_bytes(b)
                }) as f64
            })
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|c| {
                let b = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
                if little {
                    f64::from_le_bytes(b)
                } else {
                    f64::from_be_bytes(b)
                }
            })
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

    /// Headers found by the fuzzer (`tests/fuzz_readers.rs`): each used to panic (slicing the
    /// shape at `[1..0]`, or inside a multi-byte character) or is otherwise malformed.
    #[test]
    fn malformed_headers_are_errors_not_panics() {
        let with_header = |h: &str| {
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(h.len() as u16).to_le_bytes());
            b.extend_from_slice(h.as_bytes());
            b
        };
        let p = Path::new("h.npy");
        for h in [
            "{'descr': '<f4', 'fortran_order': False, 'shape': )}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': \u{e9}2,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,}",
            "{'descr': '<f4', 'fortran_order': False, 'shape'",
            "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 'x'}",
            "{'descr': '<f4', 'shape': (1,), }",
            "",
        ] {
            let e = npy_from_bytes(&with_header(h), p).unwrap_err();
            assert!(
                e.is_user_error() && e.to_string().starts_with("h.npy: "),
                "{h}: {e}"
            );
            assert!(!e.to_string().contains('\n'), "{e:?}");
        }
        // a header length past the end of the file
        let mut b = with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }");
        b[8] = 0xff;
        assert!(npy_from_bytes(&b, p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        // huge shapes are refused before anything is allocated (checked against the data)
        let e = npy_from_bytes(
            &with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }"),
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        // big-endian arrays are read too
        let mut b = with_header("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }");
        b.extend_from_slice(&1.5f32.to_be_bytes());
        b.extend_from_slice(&(-2.0f32).to_be_bytes());
        assert_eq!(npy_from_bytes(&b, p).unwrap().data, vec![1.5, -2.0]);
    }

    #[test]
    fn non_finite_values_are_named_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("noise.npy");
        let mut data = vec![0.0f32; 2 * 3 * 4];
        data[3 * 4 + 2 * 4 + 1] = f32::INFINITY; // [1, 2, 1]
        data[23] = f32::NAN; // later: not reported
        write_npy_f32(&p, &[2, 3, 4], &data).unwrap();
        let e = read_npy_finite(&p).unwrap_err();
        assert!(e.is_user_error());
        let msg = e.to_string();
        assert!(
            msg.contains("noise.npy") && msg.contains("index [1, 2, 1] (element 21 in C order) is inf"),
            "{msg}"
        );
        write_npy_f32(&p, &[2], &[1.0, 2.0]).unwrap();
        assert_eq!(read_npy_finite(&p).unwrap().data, vec![1.0, 2.0]);
    }

    #[test]
    fn text_that_is_not_utf8_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        fs::write(&p, b"{\"a\": \"\xff\"}").unwrap();
        let e = read_text(&p).unwrap_err();
        assert!(e.is_user_error(), "{e}");
        assert!(e.to_string().contains("invalid byte at offset 7"), "{e}");
    }
}
