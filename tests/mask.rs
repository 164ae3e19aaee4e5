//! src/mask.rs: threshold + dilate against a brute-force disk on synthetic
//! heatmaps, against imageproc's own `dilate(Norm::L2)` where that applies, and
//! paste-back leaving every pixel outside the mask bit-identical.
use image::{GrayImage, Rgb, RgbImage};
use imageproc::distance_transform::Norm;
use orchestrate::mask;

/// SplitMix64: a few lines of deterministic randomness, no extra dependency.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A heatmap of a few soft blobs (some touching the border), values in [0, 1].
fn blobs(rng: &mut Rng, h: usize, w: usize, n: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; h * w];
    for _ in 0..n {
        let (cy, cx) = (rng.unit() * h as f32, rng.unit() * w as f32);
        let s = 1.0 + rng.unit() * (h.min(w) as f32 / 4.0);
        let a = 0.3 + 0.7 * rng.unit();
        for y in 0..h {
            for x in 0..w {
                let d2 = (y as f32 - cy).powi(2) + (x as f32 - cx).powi(2);
                m[y * w + x] = m[y * w + x].max(a * (-d2 / (2.0 * s * s)).exp());
            }
        }
    }
    m
}

/// Brute force: a pixel is in the dilation when some mask pixel lies at
/// Euclidean distance <= r, compared on integer squared distances.
fn brute_dilate(mask: &[bool], h: usize, w: usize, r: u32) -> Vec<bool> {
    let r2 = (r as i64) * (r as i64);
    let on: Vec<(i64, i64)> = (0..h * w)
        .filter(|&i| mask[i])
        .map(|i| ((i / w) as i64, (i % w) as i64))
        .collect();
    (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as i64, (i % w) as i64);
            on.iter()
                .any(|&(my, mx)| (y - my).pow(2) + (x - mx).pow(2) <= r2)
        })
        .collect()
}

fn count(m: &[bool]) -> usize {
    m.iter().filter(|&&b| b).count()
}

#[test]
fn threshold_is_strictly_greater() {
    let hm = [0.0, 0.5, 0.50001, 1.0, f32::NAN, 0.2];
    assert_eq!(
        mask::threshold(&hm, 2, 3, 0.5).unwrap(),
        vec![false, false, true, true, false, false]
    );
    assert_eq!(
        mask::threshold(&hm, 2, 3, 0.0).unwrap(),
        vec![false, true, true, true, false, true]
    );
    assert!(mask::threshold(&hm, 2, 2, 0.5).is_err());
}

#[test]
fn threshold_and_dilate_match_brute_force() {
    let mut rng = Rng(7);
    let mut checked_nonempty = 0;
    for &(h, w) in &[(1usize, 1usize), (1, 9), (13, 17), (32, 24), (40, 40)] {
        for trial in 0..6 {
            let n = 1 + rng.below(4);
            let hm = blobs(&mut rng, h, w, n);
            let t = [0.0, 0.3, 0.6, 0.9, 0.95, 2.0][trial];
            let m = mask::threshold(&hm, h, w, t).unwrap();
            let want_m: Vec<bool> = hm.iter().map(|&v| v > t).collect();
            assert_eq!(m, want_m);
            let diag = ((h * h + w * w) as f64).sqrt().ceil() as u32;
            for r in [0u32, 1, 2, 3, 5, 8, diag, diag + 50, 300] {
                let got = mask::dilate(&m, h, w, r).unwrap();
                let want = brute_dilate(&m, h, w, r);
                assert_eq!(got, want, "{h}x{w} t={t} r={r}");
                if r == 0 {
                    assert_eq!(got, m);
                }
                if count(&m) > 0 {
                    checked_nonempty += 1;
                    assert!(count(&got) >= count(&m));
                    if r >= diag {
                        assert!(
                            got.iter().all(|&b| b),
                            "radius past the diagonal must fill {h}x{w}"
                        );
                    }
                }
            }
        }
    }
    assert!(
        checked_nonempty > 50,
        "too few non-empty masks ({checked_nonempty}) to mean anything"
    );
}

#[test]
fn dilate_agrees_with_imageproc_l2() {
    // imageproc's dilate keeps ceil(distance) <= k, i.e. distance <= k: the
    // same set as ours for every radius it can take (u8, below its 255 clamp).
    let mut rng = Rng(11);
    let (h, w) = (29, 37);
    for _ in 0..4 {
        let m = mask::threshold(&blobs(&mut rng, h, w, 3), h, w, 0.7).unwrap();
        let img = mask::to_gray_image(&m, h, w).unwrap();
        for k in [0u8, 1, 2, 4, 7, 20, 60] {
            let theirs = mask::from_gray_image(&imageproc::morphology::dilate(&img, Norm::L2, k));
            assert_eq!(mask::dilate(&m, h, w, k as u32).unwrap(), theirs, "k={k}");
        }
    }
}

#[test]
fn single_pixel_dilates_to_a_disk() {
    let (h, w) = (11, 11);
    let mut m = vec![false; h * w];
    m[5 * w + 5] = true;
    let d = mask::dilate(&m, h, w, 3).unwrap();
    // Lattice points with y^2 + x^2 <= 9: 29 of them (Gauss circle, r = 3).
    assert_eq!(count(&d), 29);
    assert!(d[5 * w + 8] && d[8 * w + 5] && !d[8 * w + 8] && d[7 * w + 7]);
}

#[test]
fn empty_mask_stays_empty() {
    let (h, w) = (16, 20);
    let hm = vec![0.0f32; h * w];
    let m = mask::threshold(&hm, h, w, 0.0).unwrap();
    assert!(mask::is_empty(&m));
    for r in [0, 1, 10, 1000] {
        assert!(mask::is_empty(&mask::dilate(&m, h, w, r).unwrap()));
    }
    let img = mask::heatmap_to_mask(&hm, h, w, 64, 80, 0.0, 12).unwrap();
    assert_eq!(img.dimensions(), (80, 64));
    assert!(img.pixels().all(|p| p[0] == 0));
}

#[test]
fn heatmap_to_mask_resizes_then_thresholds_then_dilates() {
    let mut rng = Rng(3);
    let (h, w, ih, iw) = (12, 10, 48, 40);
    let hm = blobs(&mut rng, h, w, 2);
    let img = mask::heatmap_to_mask(&hm, h, w, ih, iw, 0.5, 4).unwrap();
    let resized = mask::resize_bilinear(&hm, h, w, ih, iw).unwrap();
    let want = brute_dilate(
        &resized.iter().map(|&v| v > 0.5).collect::<Vec<_>>(),
        ih,
        iw,
        4,
    );
    assert!(
        count(&want) > 0 && count(&want) < ih * iw,
        "degenerate synthetic heatmap"
    );
    assert_eq!(img.dimensions(), (iw as u32, ih as u32));
    assert_eq!(mask::from_gray_image(&img), want);
    assert!(img.pixels().all(|p| p[0] == 0 || p[0] == 255));
}

fn noise_image(rng: &mut Rng, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |_, _| {
        let v = rng.next_u64();
        Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    })
}

#[test]
fn paste_back_changes_only_masked_pixels() {
    let mut rng = Rng(5);
    let (w, h) = (40u32, 30u32);
    let original = noise_image(&mut rng, w, h);
    let candidate = noise_image(&mut rng, w, h);
    let m = mask::dilate(
        &mask::threshold(
            &blobs(&mut rng, h as usize, w as usize, 2),
            h as usize,
            w as usize,
            0.6,
        )
        .unwrap(),
        h as usize,
        w as usize,
        2,
    )
    .unwrap();
    assert!(!mask::is_empty(&m) && count(&m) < m.len());
    let gray = mask::to_gray_image(&m, h as usize, w as usize).unwrap();
    let out = mask::paste_back(&original, &candidate, &gray).unwrap();
    for (i, (x, y, p)) in out.enumerate_pixels().enumerate() {
        let want = if m[i] {
            candidate.get_pixel(x, y)
        } else {
            original.get_pixel(x, y)
        };
        assert_eq!(p, want, "pixel ({x}, {y})");
    }

    // Empty mask: the original, byte for byte.
    let empty = GrayImage::new(w, h);
    assert_eq!(
        mask::paste_back(&original, &candidate, &empty)
            .unwrap()
            .as_raw(),
        original.as_raw()
    );
    // Sizes must match.
    assert!(mask::paste_back(&original, &noise_image(&mut rng, w + 1, h), &gray).is_err());
    assert!(mask::paste_back(&original, &candidate, &GrayImage::new(w, h + 1)).is_err());
}
