//! Pillow-exact resampling of 8-bit images: `Image.resize(size, filter)` of
//! Pillow's `libImaging/Resample.c` (and, for NEAREST, `Geometry.c`), bit for
//! bit, for RGB and L (gray) images.
//!
//! HF image processors (`ViTImageProcessor`, `CLIPImageProcessor`, ...) resize
//! through Pillow, so a model trained behind them sees these exact pixels.
//! Pillow resamples in two separable passes, horizontal then vertical (vertical
//! first when the height shrinks much more than the width, see `resize_raw`),
//! each skipped when its dimension is unchanged. A pass uses, per output pixel,
//! the filter's taps around `center = (i + 0.5) * scale` with the support
//! stretched by `scale` when downscaling (antialiasing), normalised to sum 1
//! in `f64`, then converted to fixed point with [`PRECISION_BITS`] fraction
//! bits; each output is the integer sum, rounded and clipped to `0..=255`,
//! so the intermediate image between the passes is 8-bit too. Everything
//! below follows that code's arithmetic (the same `f64` operations in the
//! same order, the same truncations), which is what makes it exact.
//! Pillow's `box` and `reducing_gap` arguments are not reproduced: HF
//! processors pass neither.
use image::{GrayImage, RgbImage};

/// Pillow's resampling filters (`PIL.Image.Resampling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// The filter of a Pillow `Resampling` code, as HF configs store it
    /// (`"resample": 2`); `None` for a code Pillow does not have (or one of
    /// its non-separable filters, which HF processors never use).
    pub fn from_pil_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    /// Pillow's `Resampling` code of this filter.
    pub fn pil_code(self) -> i64 {
        match self {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        }
    }

    /// Half-width of the kernel at scale 1 (`struct filter.support`).
    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The kernel, as `Resample.c` computes it (`f32` constants where its
    /// source has them).
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fraction bits of Pillow's fixed-point coefficients (`32 - 8 - 2`: 8 bits of
/// result, 2 of headroom for sums of coefficients outside `[0, 1]`).
pub const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One pass's taps: output `i` reads `count[i]` inputs from `first[i]` with the
/// fixed-point weights `k[i * ksize ..]`.
struct Taps {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    k: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` of `Resample.c`, for the
/// whole input (`box` = `0..in_size`).
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    // `in0`, `in1` are C floats; whole sizes below 2^24 are exact in f32.
    let (in0, in1) = (0.0f32 as f64, in_size as f32 as f64);
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut count = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = filter.weight(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for (x, wx) in w.iter().enumerate().take(n) {
            let v = if ww != 0.0 { wx / ww } else { *wx };
            let f = v * (1i64 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        first.push(xmin as usize);
        count.push(n);
    }
    Taps { ksize, first, count, k }
}

/// `clip8`: the rounded-in sum back to 8 bits.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding term every sum starts from.
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over rows `rows` of `src` (`w` x `h`, `C` channels).
fn horizontal<const C: usize>(src: &[u8], w: usize, rows: std::ops::Range<usize>, t: &Taps, out_w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * out_w * C);
    for y in rows {
        let row = &src[y * w * C..(y + 1) * w * C];
        for xx in 0..out_w {
            let k = &t.k[xx * t.ksize..xx * t.ksize + t.count[xx]];
            let mut acc = [HALF; C];
            for (x, &kx) in k.iter().enumerate() {
                let px = &row[(t.first[xx] + x) * C..(t.first[xx] + x + 1) * C];
                for c in 0..C {
                    acc[c] += px[c] as i64 * kx as i64;
                }
            }
            out.extend(acc.iter().map(|&a| clip8(a)));
        }
    }
    out
}

/// Vertical pass: output row `yy` from rows `first[yy] - offset ..` of `src`.
fn vertical<const C: usize>(src: &[u8], w: usize, t: &Taps, offset: usize, out_h: usize) -> Vec<u8> {
    let stride = w * C;
    let mut out = Vec::with_capacity(out_h * stride);
    let mut acc = vec![HALF; stride];
    for yy in 0..out_h {
        acc.fill(HALF);
        let k = &t.k[yy * t.ksize..yy * t.ksize + t.count[yy]];
        for (y, &ky) in k.iter().enumerate() {
            let row = &src[(t.first[yy] - offset + y) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i64 * ky as i64;
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

/// NEAREST, as Pillow runs it (`ImagingScaleAffine`): source positions by
/// repeated addition of the scale in `f64`, starting half a step in.
fn nearest<const C: usize>(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    // COORD(): a position outside the image (never, for a whole-image box)
    // is left black, as Pillow's `fill` leaves it.
    let positions = |in_size: usize, out_size: usize| -> Vec<Option<usize>> {
        let a = (in_size as f32 as f64) / out_size as f64;
        let mut o = 0.0f32 as f64 + a * 0.5;
        (0..out_size)
            .map(|_| {
                let i = if o < 0.0 { None } else { Some(o as usize).filter(|&i| i < in_size) };
                o += a;
                i
            })
            .collect()
    };
    let xs = positions(w, out_w);
    let ys = positions(h, out_h);
    let mut out = vec![0u8; out_w * out_h * C];
    for (yy, y) in ys.iter().enumerate() {
        let Some(y) = *y else { continue };
        let row = &src[y * w * C..(y + 1) * w * C];
        for (xx, x) in xs.iter().enumerate() {
            if let Some(x) = *x {
                out[(yy * out_w + xx) * C..][..C].copy_from_slice(&row[x * C..(x + 1) * C]);
            }
        }
    }
    out
}

/// `Image.resize((out_w, out_h), filter)` of a `w` x `h` image with `C`
/// interleaved 8-bit channels.
fn resize_raw<const C: usize>(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    if out_w == 0 || out_h == 0 {
        return Vec::new();
    }
    if w == 0 || h == 0 {
        // Nothing to sample (Pillow has no empty images); black, not a panic.
        return vec![0; out_w * out_h * C];
    }
    if (w, h) == (out_w, out_h) {
        return src.to_vec();
    }
    if filter == Filter::Nearest {
        return nearest::<C>(src, w, h, out_w, out_h);
    }
    let need_h = out_w != w;
    let need_v = out_h != h;
    // Pillow 13 runs the vertical pass first when the height shrinks by more
    // than twice what the width does (it pinned the rule in its code as a
    // speed-up; the two orders round differently between the passes). Found
    // by running Pillow 13.0.0 on thousands of size pairs (every filter,
    // inputs up to 3000 px): no exception, ties go horizontal first.
    let vertical_first = out_h < h && (h as i64 - out_h as i64) > 2 * (w as i64 - out_w as i64);
    if vertical_first {
        let vt = taps(h, out_h, filter);
        let buf = vertical::<C>(src, w, &vt, 0, out_h);
        if !need_h {
            return buf;
        }
        return horizontal::<C>(&buf, w, 0..out_h, &taps(w, out_w, filter), out_w);
    }
    let vt = taps(h, out_h, filter);
    let (buf, buf_w, offset) = if need_h {
        // Only the rows the vertical pass reads.
        let first = vt.first[0];
        let last = vt.first[out_h - 1] + vt.count[out_h - 1];
        let ht = taps(w, out_w, filter);
        (horizontal::<C>(src, w, first..last.max(first), &ht, out_w), out_w, first)
    } else {
        (src.to_vec(), w, 0)
    };
    if need_v {
        vertical::<C>(&buf, buf_w, &vt, offset, out_h)
    } else {
        buf
    }
}

/// Pillow's `Image.resize((width, height), filter)` of an RGB image, bit for bit.
/// A zero width or height gives an empty image.
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let data = resize_raw::<3>(img.as_raw(), img.width() as usize, img.height() as usize, width as usize, height as usize, filter);
    RgbImage::from_raw(width, height, data).expect("the buffer has width x height x 3 bytes")
}

/// Pillow's `Image.resize((width, height), filter)` of an L (gray) image, bit for bit.
/// A zero width or height gives an empty image.
pub fn resize_gray(img: &GrayImage, width: u32, height: u32, filter: Filter) -> GrayImage {
    let data = resize_raw::<1>(img.as_raw(), img.width() as usize, img.height() as usize, width as usize, height as usize, filter);
    GrayImage::from_raw(width, height, data).expect("the buffer has width x height bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pil_codes_round_trip() {
        for code in 0..6 {
            assert_eq!(Filter::from_pil_code(code).unwrap().pil_code(), code);
        }
        assert_eq!(Filter::from_pil_code(6), None);
        assert_eq!(Filter::from_pil_code(-1), None);
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        // Pillow's normalised taps round to within a few units of 1.0 each.
        for f in [Filter::Box, Filter::Bilinear, Filter::Hamming, Filter::Bicubic, Filter::Lanczos] {
            for (i, o) in [(37, 224), (500, 224), (97, 13), (5, 5), (1, 7), (7, 1)] {
                let t = taps(i, o, f);
                for xx in 0..o {
                    let s: i64 = t.k[xx * t.ksize..xx * t.ksize + t.count[xx]].iter().map(|&k| k as i64).sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= t.ksize as i64, "{f:?} {i}->{o} [{xx}]: {s}");
                    assert!(t.first[xx] + t.count[xx] <= i);
                }
            }
        }
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        let img = RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Lanczos] {
            assert_eq!(resize_rgb(&img, 0, 5, f).dimensions(), (0, 5));
            assert_eq!(resize_rgb(&img, 1, 1, f).get_pixel(0, 0).0, [10, 20, 30]);
            assert_eq!(resize_rgb(&img, 9, 7, f).get_pixel(8, 6).0, [10, 20, 30]);
            let empty = GrayImage::new(0, 0);
            assert_eq!(resize_gray(&empty, 4, 3, f).as_raw(), &vec![0u8; 12]);
        }
        assert_eq!(resize_rgb(&img, 3, 2, Filter::Bicubic), img);
    }
}
