//! Image output: layout (dimensions, pixel positions), the [-1, 1] -> byte map, and that the
//! files decode back to what was drawn (PNG pixels, GIF frame count).

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use diffuse::data::{self, DataSpec};
use diffuse::image_out::{self, GridOptions};
use image::AnimationDecoder;

fn tensor(values: Vec<f32>, shape: (usize, usize, usize, usize)) -> Tensor {
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// N images of 1 x h x w where image i, pixel (y, x) is the byte 10 i + 3 y + x, stored as
/// v / 127.5 - 1 (the datasets' scaling).
fn numbered(n: usize, h: usize, w: usize) -> Tensor {
    let v: Vec<f32> = (0..n)
        .flat_map(|i| (0..h * w).map(move |k| (10 * i + 3 * (k / w) + k % w) as f32 / 127.5 - 1.0))
        .collect();
    tensor(v, (n, 1, h, w))
}

fn luma(path: &Path) -> image::GrayImage {
    match image::open(path).unwrap() {
        image::DynamicImage::ImageLuma8(g) => g,
        other => panic!("expected an 8-bit grey PNG, got {:?}", other.color()),
    }
}

#[test]
fn byte_map_endpoints_midpoint_and_clamp() {
    // (x + 1) * 127.5 rounded: -1 -> 0, -0.5 -> 63.75 -> 64, 0 -> 127.5 -> 128 (half away from
    // zero), 1 -> 255; outside [-1, 1] clamps.
    let cases = [
        (-1.0, 0),
        (-0.5, 64),
        (0.0, 128),
        (1.0, 255),
        (1.7, 255),
        (-3.0, 0),
    ];
    for (x, b) in cases {
        assert_eq!(image_out::to_byte(x), b, "{x}");
    }
    // Every byte survives v -> v / 127.5 - 1 -> byte.
    for v in 0..=255u8 {
        assert_eq!(image_out::to_byte(v as f32 / 127.5 - 1.0), v);
    }
    assert_eq!(image_out::auto_scale(28, 28), 2);
    assert_eq!(image_out::auto_scale(16, 16), 4);
    assert_eq!(image_out::auto_scale(32, 32), 2);
    assert_eq!(image_out::auto_scale(64, 64), 1);
}

#[test]
fn grid_layout_dimensions_and_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.png");
    let (n, h, w, cols, g) = (5, 2, 3, 3, 2);
    let opts = GridOptions {
        columns: Some(cols),
        scale: Some(1),
        gutter: g,
    };
    image_out::save_grid_with(&p, &numbered(n, h, w), &opts).unwrap();
    let img = luma(&p);
    // 3 columns of 3 px + 4 gutters of 2 = 17 wide; 2 rows of 2 px + 3 gutters of 2 = 10 high.
    assert_eq!(img.dimensions(), (17, 10));
    for i in 0..n {
        let (row, col) = (i / cols, i % cols);
        for y in 0..h {
            for x in 0..w {
                let (px, py) = (g + col * (w + g) + x, g + row * (h + g) + y);
                assert_eq!(
                    img.get_pixel(px as u32, py as u32)[0],
                    (10 * i + 3 * y + x) as u8,
                    "image {i} ({x},{y})"
                );
            }
        }
    }
    // Gutters and the empty last cell (row 1, column 2) are white.
    assert_eq!(img.get_pixel(0, 0)[0], 255);
    assert_eq!(img.get_pixel(5, 3)[0], 255); // between columns 0 and 1
    assert_eq!(img.get_pixel(2 + 2 * 5, 2 + 4)[0], 255);
    // No temporary file left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn grid_upscale_repeats_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.png");
    // 28x28 images use the automatic upscale 2: 2 columns -> 2 * 56 + 3 * 2 = 118 wide.
    let images = numbered(2, 28, 28);
    image_out::save_grid(&p, &images, 2).unwrap();
    let img = luma(&p);
    assert_eq!(img.dimensions(), (118, 60));
    // Image 1, source pixel (y=3, x=5) = 10 + 9 + 5 = 24 covers output (x, y) in
    // 2 + 56 + 2 + [10, 11] x 2 + [6, 7].
    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        assert_eq!(img.get_pixel(60 + 10 + dx, 2 + 6 + dy)[0], 24);
    }
    assert_eq!(img.get_pixel(60 + 12, 2 + 6)[0], 25); // the next source pixel
}

#[test]
fn rgb_grid_keeps_channels() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.png");
    // One 1x1 RGB image (R, G, B) = (-1, 0, 1) -> bytes (0, 128, 255).
    image_out::save_grid_with(
        &p,
        &tensor(vec![-1.0, 0.0, 1.0], (1, 3, 1, 1)),
        &GridOptions {
            columns: Some(1),
            scale: Some(3),
            gutter: 1,
        },
    )
    .unwrap();
    let img = image::open(&p).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (5, 5));
    assert_eq!(img.get_pixel(2, 2).0, [0, 128, 255]);
    assert_eq!(img.get_pixel(0, 2).0, [255, 255, 255]);
}

#[test]
fn bad_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");
    let nan = tensor(vec![0.0, f32::NAN, 0.0, 0.0], (1, 1, 2, 2));
    assert!(image_out::save_grid(&p, &nan, 1)
        .unwrap_err()
        .to_string()
        .contains("1 of 4 values are not finite"));
    let two = tensor(vec![0.0; 8], (1, 2, 2, 2));
    assert!(image_out::save_grid(&p, &two, 1)
        .unwrap_err()
        .to_string()
        .contains("2 channels"));
    let flat = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(image_out::save_grid(&p, &flat, 1)
        .unwrap_err()
        .to_string()
        .contains("[N, C, H, W]"));
    assert!(image_out::save_grid(&p, &numbered(1, 2, 2), 0).is_err());
    assert!(!p.exists());
}

#[test]
fn save_images_writes_one_png_per_image() {
    let dir = tempfile::tempdir().unwrap();
    image_out::save_images(dir.path(), &numbered(3, 2, 3), "sample_").unwrap();
    image_out::save_images_from(dir.path(), &numbered(1, 2, 3), "sample_", 3).unwrap();
    for i in 0..3 {
        let img = luma(&dir.path().join(format!("sample_{i:05}.png")));
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.get_pixel(2, 1)[0], (10 * i + 3 + 2) as u8);
    }
    assert_eq!(luma(&dir.path().join("sample_00003.png")).get_pixel(0, 0)[0], 0);
}

#[test]
fn strip_puts_image_i_of_frame_f_at_row_i_column_f() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.png");
    // 3 frames of 2 images of 1x1; frame f image i has byte 100 f + i.
    let frames: Vec<Tensor> = (0..3)
        .map(|f| {
            tensor(
                (0..2).map(|i| (100 * f + i) as f32 / 127.5 - 1.0).collect(),
                (2, 1, 1, 1),
            )
        })
        .collect();
    image_out::save_strip(&p, &frames).unwrap();
    let img = luma(&p);
    // 1x1 images get the auto upscale 56: 3 columns -> 3 * 56 + 4 * 2 = 176; 2 rows -> 118.
    assert_eq!(img.dimensions(), (176, 118));
    for f in 0..3u32 {
        for i in 0..2u32 {
            let (x, y) = (2 + f * 58 + 28, 2 + i * 58 + 28);
            assert_eq!(img.get_pixel(x, y)[0], (100 * f + i) as u8, "frame {f} image {i}");
        }
    }
    let wrong = vec![frames[0].clone(), numbered(3, 1, 1)];
    assert!(image_out::save_strip(&p, &wrong)
        .unwrap_err()
        .to_string()
        .contains("frame 1"));
}

#[test]
fn gif_has_one_frame_per_tensor_with_exact_grey_levels() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gif");
    // 4 frames of 4 images of 2x2 (a 2x2 grid each); frame f is the constant byte 60 f + 10.
    let frames: Vec<Tensor> = (0..4)
        .map(|f| tensor(vec![(60 * f + 10) as f32 / 127.5 - 1.0; 16], (4, 1, 2, 2)))
        .collect();
    image_out::save_gif(&p, &frames, 120).unwrap();
    let file = std::io::BufReader::new(std::fs::File::open(&p).unwrap());
    let decoded = image::codecs::gif::GifDecoder::new(file)
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    assert_eq!(decoded.len(), 4);
    for (f, frame) in decoded.iter().enumerate() {
        let buf = frame.buffer();
        // 2x2 images at the auto upscale 28: 2 * 56 + 3 * 2 = 118 square.
        assert_eq!(buf.dimensions(), (118, 118));
        // Two grey levels per frame (image and gutter), so the palette is exact.
        let v = (60 * f + 10) as u8;
        assert_eq!(buf.get_pixel(30, 30).0, [v, v, v, 255], "frame {f}");
        assert_eq!(buf.get_pixel(0, 0).0, [255, 255, 255, 255]);
        assert_eq!(frame.delay().numer_denom_ms(), (120, 1));
    }
}

#[test]
fn bundled_digits_round_trip_through_a_grid() {
    // The first 10 training digits drawn in a grid at scale 1 reproduce the IDX file's bytes.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mnist.png");
    let train = data::load(&DataSpec::default()).unwrap();
    let batch = train.batch(&(0..10).collect::<Vec<_>>(), None).unwrap();
    image_out::save_grid_with(
        &p,
        &batch,
        &GridOptions {
            columns: Some(5),
            scale: Some(1),
            gutter: 2,
        },
    )
    .unwrap();
    let img = luma(&p);
    assert_eq!(img.dimensions(), (5 * 28 + 6 * 2, 2 * 28 + 3 * 2));

    let gz = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/mnist5k/train-images-idx3-ubyte.gz"
    ))
    .unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    for i in 0..10usize {
        let (row, col) = (i / 5, i % 5);
        for y in 0..28 {
            for x in 0..28 {
                let px = img.get_pixel((2 + col * 30 + x) as u32, (2 + row * 30 + y) as u32)[0];
                assert_eq!(px, raw[16 + i * 784 + y * 28 + x], "digit {i} ({x},{y})");
            }
        }
    }
}
