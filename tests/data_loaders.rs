//! Loaders against small datasets the tests write into a tempdir (good and corrupted), and the
//! bundled `mnist5k` against the counts its PROVENANCE.md and split_info.json state.

use std::io::Write;
use std::path::Path;

use diffuse::data::{self, DataSpec, EpochSampler, Format, ImageDataset, SamplerState, Split};
use diffuse::rng::Rng;

// ---------- writers for the test files ----------

fn idx_images(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2051u32, count, rows, cols] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(pixels);
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2049u32, labels.len() as u32] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn spec(dir: &Path) -> DataSpec {
    DataSpec {
        data: dir.to_str().unwrap().to_string(),
        ..DataSpec::default()
    }
}

fn load_err(spec: &DataSpec) -> String {
    match data::load(spec) {
        Ok(d) => panic!("expected an error, loaded {}", d.source()),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "'{text}' should contain '{p}'");
    }
}

/// 3 train images of 2x3 with pixel values 0, 10, 20, ... (so every pixel is distinct) and
/// 2 test images; labels 7, 1, 9 and 4, 2.
fn write_idx_set(dir: &Path, gz: bool) {
    let train: Vec<u8> = (0..18u8).map(|v| v * 10).collect();
    let test: Vec<u8> = (0..12u8).map(|v| 255 - v).collect();
    let files = [
        ("train-images-idx3-ubyte", idx_images(3, 2, 3, &train)),
        ("train-labels-idx1-ubyte", idx_labels(&[7, 1, 9])),
        ("t10k-images-idx3-ubyte", idx_images(2, 2, 3, &test)),
        ("t10k-labels-idx1-ubyte", idx_labels(&[4, 2])),
    ];
    for (name, bytes) in files {
        if gz {
            std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        } else {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

fn save_png(path: &Path, img: image::DynamicImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

fn grey(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> image::DynamicImage {
    image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)])))
}

fn rgb(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y))))
}

/// x = v / 127.5 - 1, computed the way the loaders do (f32).
fn unit(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

// ---------- IDX ----------

#[test]
fn idx_plain_and_gz_give_the_same_exact_pixels_and_labels() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_idx_set(dir.path(), gz);
        assert_eq!(data::detect(dir.path()), Format::Idx);
        let train = data::load(&spec(dir.path())).unwrap();
        assert_eq!((train.len(), train.shape()), (3, [1, 2, 3]));
        // image 1, pixel (row 1, col 2) is byte index 1*6 + 1*3 + 2 = 11 -> value 110.
        assert_eq!(train.image(1).unwrap()[5], unit(110));
        let want: Vec<f32> = (0..18u8).map(|v| unit(v * 10)).collect();
        assert_eq!(train.pixels(), &want[..]);
        assert_eq!(train.labels(), Some(&[7u32, 1, 9][..]));
        let test = data::load(&spec(dir.path()).with_split(Split::Test)).unwrap();
        assert_eq!((test.len(), test.labels()), (2, Some(&[4u32, 2][..])));
        assert_eq!(test.image(0).unwrap()[0], unit(255)); // = 1.0
        assert_eq!(test.image(0).unwrap()[0], 1.0);
        assert_contains(test.source(), &["t10k-images-idx3-ubyte"]);
    }
}

#[test]
fn idx_wrong_magic_names_file_and_expected_magic() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(dir.path(), false);
    // An images file that is really a labels file (magic 2049).
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), idx_labels(&[1, 2, 3])).unwrap();
    let e = load_err(&spec(dir.path()));
    assert_contains(
        &e,
        &["train-images-idx3-ubyte", "magic number 2049, expected 2051"],
    );
    // A labels file with the images magic.
    write_idx_set(dir.path(), false);
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte"),
        idx_images(0, 1, 1, &[]),
    )
    .unwrap();
    let e = load_err(&spec(dir.path()));
    assert_contains(
        &e,
        &["train-labels-idx1-ubyte", "magic number 2051, expected 2049"],
    );
}

#[test]
fn idx_truncated_or_trailing_bytes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..18).collect();
    let mut bytes = idx_images(3, 2, 3, &pixels);
    bytes.pop();
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), &bytes).unwrap();
    let e = load_err(&spec(dir.path()));
    // 3 images of 2x3 = 18 pixel bytes + 16 header bytes = 34; the file has 33.
    assert_contains(
        &e,
        &[
            "train-images-idx3-ubyte",
            "truncated",
            "3 images of 2x3",
            "34",
            "33",
        ],
    );
    bytes.extend_from_slice(&[0, 0]);
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), &bytes).unwrap();
    assert_contains(&load_err(&spec(dir.path())), &["trailing bytes", "35"]);
    // A header cut short.
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), &bytes[..10]).unwrap();
    assert_contains(&load_err(&spec(dir.path())), &["truncated", "header needs 16"]);
    // A truncated gzip stream.
    let gz = gzip(&idx_images(3, 2, 3, &pixels));
    std::fs::remove_file(dir.path().join("train-images-idx3-ubyte")).unwrap();
    std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), &gz[..gz.len() / 2]).unwrap();
    assert_contains(
        &load_err(&spec(dir.path())),
        &["train-images-idx3-ubyte.gz", "gzip"],
    );
    // Header sizes whose product overflows usize are caught before allocating.
    let mut huge = Vec::new();
    for v in [2051u32, u32::MAX, u32::MAX, u32::MAX] {
        huge.extend_from_slice(&v.to_be_bytes());
    }
    std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), &huge).unwrap();
    assert_contains(&load_err(&spec(dir.path())), &["overflow"]);
}

#[test]
fn idx_count_mismatch_names_the_labels_file() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(dir.path(), true);
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte.gz"),
        gzip(&idx_labels(&[1, 2])),
    )
    .unwrap();
    let e = load_err(&spec(dir.path()));
    assert_contains(&e, &["train-labels-idx1-ubyte.gz", "2 labels, expected 3"]);
}

#[test]
fn idx_missing_split_and_missing_labels() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        idx_images(1, 1, 2, &[0, 255]),
    )
    .unwrap();
    // No labels file: an unlabelled dataset.
    let d = data::load(&spec(dir.path())).unwrap();
    assert_eq!((d.len(), d.labels()), (1, None));
    assert_eq!(d.pixels(), &[-1.0, 1.0]);
    let e = load_err(&spec(dir.path()).with_split(Split::Test));
    assert_contains(
        &e,
        &["no IDX images file for the test split", "t10k-images-idx3-ubyte"],
    );
}

#[test]
fn image_size_and_channels_apply_to_idx() {
    let dir = tempfile::tempdir().unwrap();
    // One 4x4 image, constant 200: any resize of a constant image is that constant.
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        idx_images(1, 4, 4, &[200; 16]),
    )
    .unwrap();
    let s = DataSpec {
        image_size: Some(2),
        channels: Some(3),
        ..spec(dir.path())
    };
    let d = data::load(&s).unwrap();
    assert_eq!(d.shape(), [3, 2, 2]);
    for v in d.pixels() {
        // The resize weights sum to 1 in f64; the f32 result is within one rounding of the value.
        assert!((v - unit(200)).abs() < 1e-6, "{v}");
    }
    assert_contains(d.source(), &["resized to 2x2", "converted to 3 channels"]);
}

// ---------- CIFAR-10 ----------

/// One CIFAR record: label, then pixel (c, y, x) = (c * 7 + y * 3 + x + seed) mod 256.
fn cifar_record(label: u8, seed: u32) -> Vec<u8> {
    let mut r = vec![label];
    for c in 0..3u32 {
        for y in 0..32u32 {
            for x in 0..32u32 {
                r.push(((c * 7 + y * 3 + x + seed) % 256) as u8);
            }
        }
    }
    r
}

#[test]
fn cifar_batches_load_in_order_with_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let batches = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&batches).unwrap();
    // data_batch_2 is written first and data_batch_10 exists: order must be numeric.
    std::fs::write(
        batches.join("data_batch_2.bin"),
        [cifar_record(3, 2), cifar_record(4, 3)].concat(),
    )
    .unwrap();
    std::fs::write(
        batches.join("data_batch_1.bin"),
        [cifar_record(0, 0), cifar_record(1, 1)].concat(),
    )
    .unwrap();
    std::fs::write(batches.join("data_batch_10.bin"), cifar_record(9, 9)).unwrap();
    std::fs::write(batches.join("test_batch.bin"), cifar_record(5, 50)).unwrap();
    // The parent directory is detected through cifar-10-batches-bin/.
    assert_eq!(data::detect(dir.path()), Format::Cifar10);
    let train = data::load(&spec(dir.path())).unwrap();
    assert_eq!((train.len(), train.shape()), (5, [3, 32, 32]));
    assert_eq!(train.labels(), Some(&[0u32, 1, 3, 4, 9][..]));
    assert_eq!(train.class_names().unwrap()[3], "cat");
    // Image 2 (seed 2), pixel (c=2, y=5, x=7): (14 + 15 + 7 + 2) % 256 = 38.
    assert_eq!(train.image(2).unwrap()[2 * 1024 + 5 * 32 + 7], unit(38));
    for (i, s) in [0u32, 1, 2, 3, 9].iter().enumerate() {
        let want: Vec<f32> = cifar_record(0, *s)[1..].iter().map(|&v| unit(v)).collect();
        assert_eq!(train.image(i).unwrap(), &want[..], "image {i}");
    }
    let test = data::load(&spec(&batches).with_split(Split::Test)).unwrap();
    assert_eq!((test.len(), test.labels()), (1, Some(&[5u32][..])));
    // batches.meta.txt overrides the names.
    let names: String = (0..10).map(|i| format!("class{i}\n")).collect();
    std::fs::write(batches.join("batches.meta.txt"), names + "\n").unwrap();
    let test = data::load(&spec(&batches).with_split(Split::Test)).unwrap();
    assert_eq!(test.class_names().unwrap()[5], "class5");
}

#[test]
fn cifar_bad_length_and_bad_label_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = [cifar_record(1, 0), cifar_record(2, 0)].concat();
    bytes.extend_from_slice(&[0; 5]);
    std::fs::write(dir.path().join("data_batch_1.bin"), &bytes).unwrap();
    let e = load_err(&spec(dir.path()));
    assert_contains(
        &e,
        &[
            "data_batch_1.bin",
            "6151 bytes",
            "multiple of 3073",
            "2 whole records and 5 bytes left over",
        ],
    );
    std::fs::write(
        dir.path().join("data_batch_1.bin"),
        [cifar_record(1, 0), cifar_record(10, 0)].concat(),
    )
    .unwrap();
    assert_contains(
        &load_err(&spec(dir.path())),
        &["data_batch_1.bin", "record 1: label 10, expected 0..9"],
    );
    // No test batch.
    std::fs::write(dir.path().join("data_batch_1.bin"), cifar_record(1, 0)).unwrap();
    assert_contains(
        &load_err(&spec(dir.path()).with_split(Split::Test)),
        &["test_batch.bin"],
    );
}

// ---------- image folders ----------

#[test]
fn folder_with_class_subfolders_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    save_png(
        &root.join("train/cat/a.png"),
        grey(3, 2, |x, y| (10 * x + 100 * y) as u8),
    );
    save_png(&root.join("train/dog/deep/b.png"), grey(3, 2, |_, _| 255));
    save_png(&root.join("train/cat/c.PNG"), grey(3, 2, |_, _| 0));
    save_png(&root.join("test/dog/d.png"), grey(3, 2, |_, _| 7));
    save_png(&root.join("test/emu/e.png"), grey(3, 2, |_, _| 9));
    std::fs::write(root.join("train/cat/notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("train/cat/.hidden.png"), "not an image either").unwrap();
    assert_eq!(data::detect(root), Format::Folder);
    let train = data::load(&spec(root)).unwrap();
    // Sorted paths: cat/a.png, cat/c.PNG, dog/deep/b.png; classes from both splits: cat, dog, emu.
    assert_eq!((train.len(), train.shape()), (3, [1, 2, 3]));
    assert_eq!(train.class_names().unwrap(), &["cat", "dog", "emu"]);
    assert_eq!(train.labels(), Some(&[0u32, 0, 1][..]));
    // a.png pixel (x=2, y=1) = 20 + 100 = 120 at index 1*3 + 2.
    assert!((train.image(0).unwrap()[5] - unit(120)).abs() < 1e-6);
    assert_eq!(train.image(2).unwrap()[0], 1.0);
    let test = data::load(&spec(root).with_split(Split::Test)).unwrap();
    assert_eq!(test.labels(), Some(&[1u32, 2][..]));
    // With train/ but no test/, asking for test names what is missing.
    std::fs::remove_dir_all(root.join("test")).unwrap();
    let e = load_err(&spec(root).with_split(Split::Test));
    assert_contains(
        &e,
        &["has a train/ subfolder but no test/ subfolder for the test split"],
    );
}

#[test]
fn folder_without_splits_is_train_only_and_unlabelled_when_images_sit_at_the_top() {
    let dir = tempfile::tempdir().unwrap();
    save_png(&dir.path().join("a.png"), grey(2, 2, |_, _| 0));
    save_png(&dir.path().join("sub/b.png"), grey(2, 2, |_, _| 0));
    let d = data::load(&spec(dir.path())).unwrap();
    assert_eq!((d.len(), d.labels(), d.class_names()), (2, None, None));
    let e = load_err(&spec(dir.path()).with_split(Split::Test));
    assert_contains(&e, &["no train/ and test/ subfolders", "no test split"]);
}

#[test]
fn folder_channels_auto_and_converted() {
    let dir = tempfile::tempdir().unwrap();
    save_png(&dir.path().join("a.png"), rgb(1, 1, |_, _| [200, 100, 50]));
    save_png(&dir.path().join("b.png"), grey(1, 1, |_, _| 40));
    // One colour image: 3 channels; the grey one is replicated.
    let d = data::load(&spec(dir.path())).unwrap();
    assert_eq!(d.shape(), [3, 1, 1]);
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
    assert!(close(d.image(0).unwrap(), &[unit(200), unit(100), unit(50)]));
    assert!(close(d.image(1).unwrap(), &[unit(40); 3]));
    // --channels 1: BT.601 luma 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2 (in byte units;
    // the map to [-1, 1] is affine with weights summing to 1, so it commutes).
    let d = data::load(&DataSpec {
        channels: Some(1),
        ..spec(dir.path())
    })
    .unwrap();
    assert_eq!(d.shape(), [1, 1, 1]);
    assert!((d.image(0).unwrap()[0] - (124.2 / 127.5 - 1.0)).abs() < 1e-6);
    // All grey: 1 channel by default.
    std::fs::remove_file(dir.path().join("a.png")).unwrap();
    assert_eq!(data::load(&spec(dir.path())).unwrap().shape(), [1, 1, 1]);
}

#[test]
fn folder_unreadable_image_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    save_png(&dir.path().join("a.png"), grey(2, 2, |_, _| 0));
    std::fs::write(
        dir.path().join("broken.jpg"),
        b"\xff\xd8\xff this is not really a jpeg",
    )
    .unwrap();
    let e = load_err(&spec(dir.path()));
    assert_contains(&e, &["broken.jpg", "cannot decode the image"]);
}

#[test]
fn folder_mixed_sizes_error_without_image_size_and_resize_with_it() {
    let dir = tempfile::tempdir().unwrap();
    save_png(&dir.path().join("a.png"), grey(4, 4, |_, _| 0));
    save_png(&dir.path().join("b.png"), grey(6, 3, |_, _| 0));
    save_png(&dir.path().join("c.png"), grey(5, 5, |_, _| 0));
    let e = load_err(&spec(dir.path()));
    assert_contains(
        &e,
        &[
            "b.png",
            "image is 3x6 (height x width), expected 4x4 like",
            "a.png",
            "--image-size",
        ],
    );
    let d = data::load(&DataSpec {
        image_size: Some(3),
        ..spec(dir.path())
    })
    .unwrap();
    assert_eq!((d.len(), d.shape()), (3, [1, 3, 3]));
}

#[test]
fn folder_empty_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("nothing_here")).unwrap();
    std::fs::write(dir.path().join("readme.txt"), "hi").unwrap();
    let e = load_err(&spec(dir.path()));
    assert_contains(&e, &["no images found", ".png, .jpg, .jpeg"]);
}

#[test]
fn resize_and_centre_crop_are_exact_on_hand_made_images() {
    let dir = tempfile::tempdir().unwrap();
    // 4 wide x 2 high, pixel (x, y) = 40 x + 10 y. Shorter side 2 = image_size, so no resampling
    // (the filter at scale 1 is the identity); the centre crop keeps columns (4 - 2) / 2 = 1 and 2.
    save_png(
        &dir.path().join("wide/a.png"),
        grey(4, 2, |x, y| (40 * x + 10 * y) as u8),
    );
    let d = data::load(&DataSpec {
        image_size: Some(2),
        ..spec(&dir.path().join("wide"))
    })
    .unwrap();
    let want: Vec<f32> = [40u8, 80, 50, 90].iter().map(|&v| unit(v)).collect();
    let got = d.image(0).unwrap();
    assert!(
        got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6),
        "{got:?} vs {want:?}"
    );

    // 4x4 -> 2x2, pixel (x, y) = a_x + b_y with a = (0, 40, 80, 120), b = (0, 8, 16, 24).
    // Triangle filter at scale 2: output 0 weighs sources (0, 1, 2) by (3, 3, 1) / 7, output 1
    // weighs (1, 2, 3) by (1, 3, 3) / 7 (see data::resize). The filter is linear and the image
    // separable in sum form, so out(x, y) = A_x + B_y with
    //   A_0 = (3*0 + 3*40 + 80) / 7 = 200/7,  A_1 = (40 + 3*80 + 3*120) / 7 = 640/7,
    //   B_0 = (3*0 + 3*8 + 16) / 7  = 40/7,   B_1 = (8 + 3*16 + 3*24) / 7  = 128/7.
    let (a, b) = ([0u32, 40, 80, 120], [0u32, 8, 16, 24]);
    save_png(
        &dir.path().join("square/a.png"),
        grey(4, 4, |x, y| (a[x as usize] + b[y as usize]) as u8),
    );
    let d = data::load(&DataSpec {
        image_size: Some(2),
        ..spec(&dir.path().join("square"))
    })
    .unwrap();
    let (big_a, big_b) = ([200.0 / 7.0, 640.0 / 7.0], [40.0 / 7.0, 128.0 / 7.0]);
    let got = d.image(0).unwrap();
    for y in 0..2 {
        for x in 0..2 {
            let want = ((big_a[x] + big_b[y]) / 127.5 - 1.0) as f32;
            // f32 storage and f64 arithmetic: a few ulps of values near 1.
            assert!(
                (got[y * 2 + x] - want).abs() < 1e-6,
                "({x},{y}) {} vs {want}",
                got[y * 2 + x]
            );
        }
    }
}

// ---------- selection ----------

#[test]
fn format_override_detection_and_bad_paths() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_set(dir.path(), false);
    // Forcing the folder format on IDX files finds no images.
    let e = load_err(&DataSpec {
        format: Some(Format::Folder),
        ..spec(dir.path())
    });
    assert_contains(&e, &["no images found"]);
    let e = load_err(&DataSpec {
        format: Some(Format::Cifar10),
        ..DataSpec::default()
    });
    assert_contains(&e, &["mnist5k is the bundled IDX dataset"]);
    let e = load_err(&spec(&dir.path().join("missing")));
    assert_contains(&e, &["missing", "no such file or directory", "mnist5k"]);
    let e = load_err(&spec(&dir.path().join("train-images-idx3-ubyte")));
    assert_contains(&e, &["not a directory"]);
    assert_contains(
        &load_err(&DataSpec {
            channels: Some(2),
            ..DataSpec::default()
        }),
        &["channels", "1 or 3"],
    );
    assert_eq!("cifar10".parse::<Format>().unwrap(), Format::Cifar10);
    assert_contains(
        &"png".parse::<Format>().unwrap_err().to_string(),
        &["idx, cifar10 or folder"],
    );
    assert_eq!("test".parse::<Split>().unwrap(), Split::Test);
}

// ---------- batches and flips ----------

#[test]
fn batch_gathers_and_flips_per_image_from_the_callers_rng() {
    // 8 images of 1x2x3, image i pixel k = 10 i + k (asymmetric rows).
    let pixels: Vec<f32> = (0..8)
        .flat_map(|i| (0..6).map(move |k| (10 * i + k) as f32))
        .collect();
    let d = ImageDataset::new(pixels, [1, 2, 3], None, None, "test".into()).unwrap();
    let plain = d.batch(&[5, 2], None).unwrap();
    assert_eq!(plain.dims(), &[2, 1, 2, 3]);
    assert_eq!(
        plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [50., 51., 52., 53., 54., 55., 20., 21., 22., 23., 24., 25.]
    );

    let indices: Vec<usize> = (0..8).collect();
    let mut rng = Rng::new(11);
    let flipped = d.batch(&indices, Some(&mut rng)).unwrap();
    let got = flipped.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Replay the documented draws: one rng.below(2) per image, 1 means mirror.
    let mut replay = Rng::new(11);
    let mut n_flipped = 0;
    for i in 0..8 {
        let base = (10 * i) as f32;
        let want: Vec<f32> = if replay.below(2) == 1 {
            n_flipped += 1;
            [2., 1., 0., 5., 4., 3.].iter().map(|k| base + k).collect()
        } else {
            (0..6).map(|k| base + k as f32).collect()
        };
        assert_eq!(&got[i * 6..i * 6 + 6], &want[..], "image {i}");
    }
    // Seed 11 flips some and keeps some, so both branches were checked.
    assert!(n_flipped > 0 && n_flipped < 8, "{n_flipped}");
    // The caller's generator advanced by exactly one draw per image.
    assert_eq!(rng, replay);
    assert!(d
        .batch(&[8], None)
        .unwrap_err()
        .to_string()
        .contains("below the dataset size 8"));
}

// ---------- the bundled dataset ----------

#[test]
fn bundled_mnist5k_matches_its_provenance() {
    let train = data::load(&DataSpec::default()).unwrap();
    let test = data::load(&DataSpec::default().with_split(Split::Test)).unwrap();
    for (d, n, per_class, mean01) in [
        // Means from data/mnist5k/split_info.json (pixel_mean_train_01 / pixel_mean_test_01).
        (&train, 4000, 400, 0.1314967924669868),
        (&test, 1000, 100, 0.1306109793917567),
    ] {
        assert_eq!((d.len(), d.shape()), (n, [1, 28, 28]));
        let mut counts = [0usize; 10];
        for &l in d.labels().unwrap() {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [per_class; 10]);
        assert_eq!(d.class_names().unwrap()[7], "7");
        let (mut lo, mut hi, mut sum) = (f32::MAX, f32::MIN, 0f64);
        for &x in d.pixels() {
            lo = lo.min(x);
            hi = hi.max(x);
            sum += (x as f64 + 1.0) / 2.0;
            // Every value is an 8-bit level: (x + 1) * 127.5 is an integer (to f32 rounding).
            let v = (x + 1.0) * 127.5;
            assert!((v - v.round()).abs() < 1e-3, "{x}");
        }
        assert_eq!((lo, hi), (-1.0, 1.0));
        // The mean of v / 255 over all pixels; v / 127.5 - 1 in f32 then (x + 1) / 2 in f64 is
        // within 1e-7 of v / 255 per pixel, so the means agree to 1e-7.
        let mean = sum / d.pixels().len() as f64;
        assert!((mean - mean01).abs() < 1e-7, "{mean} vs {mean01}");
    }
}

// ---------- the training order ----------

#[test]
fn epoch_sampler_is_a_permutation_per_epoch_and_deterministic() {
    let mut a = EpochSampler::new(5, 10).unwrap();
    let mut b = EpochSampler::new(5, 10).unwrap();
    let mut c = EpochSampler::new(6, 10).unwrap();
    let xa: Vec<usize> = (0..10).flat_map(|_| a.next_batch(4)).collect();
    let xb: Vec<usize> = (0..10).flat_map(|_| b.next_batch(4)).collect();
    let xc: Vec<usize> = (0..10).flat_map(|_| c.next_batch(4)).collect();
    assert_eq!(xa, xb);
    assert_ne!(xa, xc);
    // 40 indices = 4 whole epochs, each a permutation of 0..10, and not all the same order.
    let epochs: Vec<Vec<usize>> = xa.chunks(10).map(|e| e.to_vec()).collect();
    for e in &epochs {
        let mut s = e.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
    }
    assert_ne!(epochs[0], epochs[1]);
    assert_eq!((a.epoch(), a.position()), (4, 0));
    assert!(EpochSampler::new(1, 0).is_err());
}

#[test]
fn epoch_sampler_resumes_the_exact_order() {
    let mut straight = EpochSampler::new(42, 7).unwrap();
    let full: Vec<Vec<usize>> = (0..9).map(|_| straight.next_batch(3)).collect();

    let mut first = EpochSampler::new(42, 7).unwrap();
    let mut resumed_run: Vec<Vec<usize>> = (0..4).map(|_| first.next_batch(3)).collect();
    // 12 indices drawn: epoch 1, position 5.
    assert_eq!(
        first.state(),
        SamplerState {
            seed: 42,
            len: 7,
            epoch: 1,
            position: 5
        }
    );
    let json = serde_json::to_string(&first).unwrap();
    drop(first);
    let mut second: EpochSampler = serde_json::from_str(&json).unwrap();
    resumed_run.extend((0..5).map(|_| second.next_batch(3)));
    assert_eq!(resumed_run, full);

    // A corrupted state is rejected on load.
    let bad = r#"{"seed":1,"len":7,"epoch":0,"position":7}"#;
    let e = serde_json::from_str::<EpochSampler>(bad).unwrap_err().to_string();
    assert!(e.contains("position"), "{e}");
}

#[test]
fn resize_matches_pillow_bilinear() {
    // tests/fixtures/resize_pillow.json, made by tests/fixtures/make_resize_pillow.py: Pillow's
    // float BILINEAR resize + centre crop of a grey 23x37 and an RGB 30x17 image, shrinking and
    // enlarging. The images go through PNG files and the folder loader, as a user's would.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/resize_pillow.json"
    ))
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let (c, h, w) = (shape[0], shape[1], shape[2]);
        let planes: Vec<u8> = case["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        let at = |ch: usize, x: u32, y: u32| planes[(ch * h + y as usize) * w + x as usize];
        let dir = tempfile::tempdir().unwrap();
        let img = if c == 1 {
            grey(w as u32, h as u32, |x, y| at(0, x, y))
        } else {
            rgb(w as u32, h as u32, |x, y| [at(0, x, y), at(1, x, y), at(2, x, y)])
        };
        save_png(&dir.path().join("img.png"), img);
        for (size, want) in case["resized"].as_object().unwrap() {
            let size: usize = size.parse().unwrap();
            let d = data::load(&DataSpec {
                image_size: Some(size),
                ..spec(dir.path())
            })
            .unwrap();
            assert_eq!(d.shape(), [c, size, size]);
            let want: Vec<f64> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (k, (got, want)) in d.image(0).unwrap().iter().zip(&want).enumerate() {
                // In byte units: the fixture is rounded to 1e-4 and f32 storage of values in
                // [-1, 1] adds at most 6e-8 * 127.5 = 8e-6; Pillow computes in f32 too (2e-5 seen).
                let got = (*got as f64 + 1.0) * 127.5;
                assert!(
                    (got - want).abs() < 2e-4,
                    "{} size {size} value {k}: {got} vs {want}",
                    case["name"]
                );
            }
        }
    }
}
