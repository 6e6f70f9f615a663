//! CIFAR-10 binary batches (Krizhevsky 2009, <https://www.cs.toronto.edu/~kriz/cifar.html>):
//! `data_batch_1.bin` .. `data_batch_5.bin` (train) and `test_batch.bin` (test).
//!
//! Each file is a sequence of 3,073-byte records: one label byte (0..9), then a 32x32 image as
//! 1,024 red, 1,024 green and 1,024 blue bytes, each plane row-major — already `[C, H, W]`.
//! `batches.meta.txt` lists the class names, one a line; without it the standard ten are used.
//! The directory may be the one the archive unpacks to (`cifar-10-batches-bin/`) or its parent.

use std::path::{Path, PathBuf};

use super::{ImageDataset, Split};
use crate::error::{Error, Result};

/// Image side length.
pub const SIDE: usize = 32;
/// Bytes per record: 1 label byte + 3 x 32 x 32 pixel bytes.
pub const RECORD: usize = 1 + 3 * SIDE * SIDE;
/// CIFAR-10's classes, in label order (as in `batches.meta.txt`).
pub const CLASS_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The directory that holds the batches: `dir` itself, or `dir/cifar-10-batches-bin`.
pub fn batches_dir(dir: &Path) -> Option<PathBuf> {
    let has_batches = |d: &Path| d.join("test_batch.bin").is_file() || !train_batches(d).is_empty();
    if has_batches(dir) {
        return Some(dir.to_path_buf());
    }
    let nested = dir.join("cifar-10-batches-bin");
    has_batches(&nested).then_some(nested)
}

/// `data_batch_N.bin` files in `dir`, sorted by N.
fn train_batches(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name
                .strip_prefix("data_batch_")?
                .strip_suffix(".bin")?
                .parse()
                .ok()?;
            e.path().is_file().then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Appends the records of one batch file to `pixels` (mapped to [-1, 1]) and `labels`.
pub fn parse_batch(bytes: &[u8], path: &Path, pixels: &mut Vec<f32>, labels: &mut Vec<u32>) -> Result<()> {
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(Error::bad_input(
            path,
            format!(
                "{} bytes, expected a positive multiple of {RECORD} (CIFAR-10 records: 1 label byte + 3x32x32 pixels){}",
                bytes.len(),
                if bytes.len() % RECORD != 0 {
                    format!("; {} whole records and {} bytes left over", bytes.len() / RECORD, bytes.len() % RECORD)
                } else {
                    String::new()
                }
            ),
        ));
    }
    pixels.reserve(bytes.len() / RECORD * (RECORD - 1));
    for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
        let label = record[0];
        if label as usize >= CLASS_NAMES.len() {
            return Err(Error::bad_input(
                path,
                format!("record {i}: label {label}, expected 0..9 (CIFAR-10 has ten classes)"),
            ));
        }
        labels.push(label as u32);
        pixels.extend(record[1..].iter().map(|&v| super::unit_from_u8(v)));
    }
    Ok(())
}

/// Class names from `batches.meta.txt` (non-empty lines), or the standard ten when absent.
fn class_names(dir: &Path) -> Result<Vec<String>> {
    let meta = dir.join("batches.meta.txt");
    if !meta.is_file() {
        return Ok(CLASS_NAMES.iter().map(|s| s.to_string()).collect());
    }
    let text = crate::io::read_text(&meta)?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != CLASS_NAMES.len() {
        return Err(Error::bad_input(
            &meta,
            format!("{} class names, expected 10 (one a line)", names.len()),
        ));
    }
    Ok(names)
}

/// Loads `split` from a directory of CIFAR-10 binary batches: every `data_batch_N.bin` present
/// (in order of N) for train, `test_batch.bin` for test.
pub fn load_dir(dir: &Path, split: Split) -> Result<ImageDataset> {
    let dir = batches_dir(dir).unwrap_or_else(|| dir.to_path_buf());
    let files = match split {
        Split::Train => train_batches(&dir),
        Split::Test => {
            let p = dir.join("test_batch.bin");
            if p.is_file() {
                vec![p]
            } else {
                Vec::new()
            }
        }
    };
    if files.is_empty() {
        let want = match split {
            Split::Train => "data_batch_1.bin .. data_batch_5.bin",
            Split::Test => "test_batch.bin",
        };
        return Err(Error::bad_input(
            &dir,
            format!("no CIFAR-10 batches for the {split} split (looked for {want})"),
        ));
    }
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        parse_batch(&bytes, f, &mut pixels, &mut labels)?;
    }
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    ImageDataset::new(
        pixels,
        [3, SIDE, SIDE],
        Some(labels),
        Some(class_names(&dir)?),
        format!("CIFAR-10 {} ({})", dir.display(), names.join(", ")),
    )
}
