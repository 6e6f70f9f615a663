//! PyTorch state dicts (`torch.save`'s zip format), read through candle's pickle reader after
//! checking that the file can be read within what its size justifies.
//!
//! candle's reader trusts the file: a string length in the pickle (`BINUNICODE`'s four-byte
//! length) becomes one allocation, and a tensor's declared shape becomes the size of its buffer
//! before a byte is read, so a damaged 100 KB file can ask for gigabytes. Before handing the file
//! to candle, [`read_state_dict`] walks every `data.pkl` of the archive opcode by opcode (the
//! opcodes candle knows), bounding every length by the bytes that remain and every object the
//! memo copies by the pickle's own size, and then checks each tensor's storage against its
//! entry in the archive.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{escape_controls, Error, Result};

/// The tensors of the state dict in `path` (zip format, as `torch.save` writes since PyTorch 1.6).
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bad = |what: String| Error::bad_input(path, what);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a zip archive ({})", escape_controls(&e.to_string()))))?;
    let file_size = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    let mut pickles = Vec::new();
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| {
            bad(format!(
                "damaged zip archive ({})",
                escape_controls(&e.to_string())
            ))
        })?;
        let name = entry.name().map(|n| n.into_owned()).map_err(|e| {
            bad(format!(
                "damaged zip archive ({})",
                escape_controls(&e.to_string())
            ))
        })?;
        if entry.size() > file_size {
            return Err(bad(format!(
                "zip entry `{}` declares {} bytes in a file of {file_size} (damaged or compressed)",
                escape_controls(&name),
                entry.size()
            )));
        }
        if name.ends_with("data.pkl") {
            pickles.push((i, name));
        }
    }
    if pickles.is_empty() {
        return Err(bad("no data.pkl in the archive: not a PyTorch state dict".into()));
    }
    for (i, name) in pickles {
        let mut entry = zip.by_index(i).map_err(|e| {
            bad(format!(
                "damaged zip archive ({})",
                escape_controls(&e.to_string())
            ))
        })?;
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .by_ref()
            .take(file_size)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("`{}` cannot be read ({e})", escape_controls(&name))))?;
        check_pickle(&bytes).map_err(|what| bad(format!("`{}`: {what}", escape_controls(&name))))?;
    }
    let pth = candle_core::pickle::PthTensors::new(path, None).map_err(|e| {
        bad(format!(
            "not a readable PyTorch state dict ({})",
            escape_controls(&e.to_string())
        ))
    })?;
    let mut tensors = HashMap::new();
    for (name, info) in pth.tensor_infos() {
        let need = info.layout.shape().elem_count() as u64 * info.dtype.size_in_bytes() as u64
            + info.layout.start_offset() as u64 * info.dtype.size_in_bytes() as u64;
        let have = zip
            .by_name(&info.path)
            .map_err(|_| {
                bad(format!(
                    "tensor `{}`: no storage `{}` in the archive",
                    escape_controls(name),
                    escape_controls(&info.path)
                ))
            })?
            .size();
        if need > have {
            return Err(bad(format!(
                "tensor `{}` of shape {:?} needs {need} bytes, its storage holds {have}",
                escape_controls(name),
                info.layout.dims()
            )));
        }
        let t = pth
            .get(name)
            .map_err(|e| {
                bad(format!(
                    "tensor `{}`: {}",
                    escape_controls(name),
                    escape_controls(&e.to_string())
                ))
            })?
            .ok_or_else(|| bad(format!("tensor `{}` cannot be read", escape_controls(name))))?;
        tensors.insert(name.clone(), t.to_device(&Device::Cpu)?);
    }
    Ok(tensors)
}

/// Walks a pickle with candle's opcodes. Every argument must lie inside the bytes, and every
/// object on the stack or in the memo (counted in objects plus string bytes) must stay under
/// a bound proportional to the pickle's length, so `BINGET` cannot multiply an object.
fn check_pickle(bytes: &[u8]) -> std::result::Result<(), String> {
    let limit = 16 * bytes.len() as u64 + 4096;
    // None: a MARK
    let mut stack: Vec<Option<u64>> = Vec::new();
    let mut memo: HashMap<u32, u64> = HashMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        if n > bytes.len() - *at {
            return Err(format!("truncated pickle: an argument of {n} bytes at byte {at}"));
        }
        let s = &bytes[*at..*at + n];
        *at += n;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Option<u64>>| -> std::result::Result<u64, String> {
        match stack.pop() {
            Some(Some(s)) => Ok(s),
            _ => Err("malformed pickle: an object taken from an empty stack".into()),
        }
    };
    let pop_to_mark = |stack: &mut Vec<Option<u64>>| -> std::result::Result<u64, String> {
        let mut sum = 0u64;
        loop {
            match stack.pop() {
                Some(Some(s)) => sum += s,
                Some(None) => return Ok(sum),
                None => return Err("malformed pickle: no MARK".into()),
            }
        }
    };
    let u32_le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    loop {
        let op = *take(&mut at, 1)?.first().expect("one byte");
        let pushed: Option<u64> = match op {
            0x80 => {
                take(&mut at, 1)?;
                None
            }
            b'c' => {
                let mut n = 0;
                for _ in 0..2 {
                    let rest = &bytes[at..];
                    let line = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("truncated pickle: a GLOBAL name without its newline")?;
                    at += line + 1;
                    n += line as u64;
                }
                Some(1 + n)
            }
            b'X' => {
                let len = u32_le(take(&mut at, 4)?) as usize;
                take(&mut at, len)?;
                Some(1 + len as u64)
            }
            b'J' => {
                take(&mut at, 4)?;
                Some(1)
            }
            b'K' => {
                take(&mut at, 1)?;
                Some(1)
            }
            b'M' => {
                take(&mut at, 2)?;
                Some(1)
            }
            b'G' => {
                take(&mut at, 8)?;
                Some(1)
            }
            0x8a => {
                let n = take(&mut at, 1)?[0] as usize;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes (at most 8 are read)"));
                }
                take(&mut at, n)?;
                Some(1)
            }
            b'N' | 0x88 | 0x89 | b')' | b'}' | b'd' | b']' => Some(1),
            b'(' => {
                stack.push(None);
                None
            }
            b't' => Some(1 + pop_to_mark(&mut stack)?),
            0x85..=0x87 => {
                let mut s = 1;
                for _ in 0..(op - 0x84) {
                    s += pop(&mut stack)?;
                }
                Some(s)
            }
            b'Q' => Some(1 + pop(&mut stack)?),
            b'R' | b'b' | 0x81 => Some(1 + pop(&mut stack)? + pop(&mut stack)?),
            b'a' => Some(pop(&mut stack)? + pop(&mut stack)?),
            b's' => Some(pop(&mut stack)? + pop(&mut stack)? + pop(&mut stack)?),
            b'e' | b'u' => {
                let items = pop_to_mark(&mut stack)?;
                Some(items + pop(&mut stack)?)
            }
            b'q' | b'r' => {
                let key = if op == b'q' {
                    take(&mut at, 1)?[0] as u32
                } else {
                    u32_le(take(&mut at, 4)?)
                };
                let top = match stack.last() {
                    Some(Some(s)) => *s,
                    _ => return Err("malformed pickle: PUT with nothing to store".into()),
                };
                memo.insert(key, top);
                None
            }
            b'h' | b'j' => {
                let key = if op == b'h' {
                    take(&mut at, 1)?[0] as u32
                } else {
                    u32_le(take(&mut at, 4)?)
                };
                Some(
                    *memo
                        .get(&key)
                        .ok_or_else(|| format!("malformed pickle: GET of memo {key}, never stored"))?,
                )
            }
            b'.' => return Ok(()),
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} at byte {} is not read here",
                    at - 1
                ))
            }
        };
        if let Some(s) = pushed {
            if s > limit {
                return Err(format!(
                    "the pickle builds an object of {s} parts from {} bytes (a damaged or hostile file)",
                    bytes.len()
                ));
            }
            stack.push(Some(s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memo_that_doubles_an_object_is_refused() {
        // ( ) q0  then 40 x: h0 h0 0x86 q0  (each round doubles the tuple), then STOP
        let mut p = vec![0x80, 2, b')', b'q', 0];
        for _ in 0..40 {
            p.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let e = check_pickle(&p).unwrap_err();
        assert!(e.contains("parts"), "{e}");
        // a few rounds are fine
        let mut q = vec![0x80, 2, b')', b'q', 0];
        for _ in 0..3 {
            q.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        q.push(b'.');
        check_pickle(&q).unwrap();
    }

    #[test]
    fn a_string_longer_than_the_pickle_is_refused() {
        let mut p = vec![0x80, 2, b'X'];
        p.extend_from_slice(&0xfff0_0000u32.to_le_bytes());
        p.extend_from_slice(b"abc.");
        assert!(check_pickle(&p).unwrap_err().contains("truncated"));
        let mut ok = vec![0x80, 2, b'X'];
        ok.extend_from_slice(&3u32.to_le_bytes());
        ok.extend_from_slice(b"abc.");
        check_pickle(&ok).unwrap();
    }
}
