//! Image preprocessing and seeded augmentation, and a prefetcher that prepares batches on
//! worker threads ahead of the training loop.
//!
//! Every random choice for an image comes from a generator seeded by (run seed, epoch,
//! position), so a batch is the same whichever thread makes it and after a resume.

use crate::images::Image;
use image::imageops::FilterType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// The model's input: size, channels and normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Square side the model reads.
    pub size: usize,
    /// 1 (gray) or 3 (RGB); images are converted to this.
    pub channels: usize,
    /// Per-channel mean and standard deviation subtracted and divided after scaling to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Preprocess {
    /// Checks that the statistics have one entry per channel and positive deviations.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.channels == 1 || self.channels == 3) {
            return Err(format!("channels must be 1 or 3, found {}", self.channels));
        }
        if self.size == 0 {
            return Err("the image size must be positive".into());
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return Err(format!(
                "image_mean and image_std need {} values each (one per channel), found {} and {}",
                self.channels,
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err("image_std values must be positive".into());
        }
        Ok(())
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }
}

/// Colour jitter strengths (factors drawn from `[1 - s, 1 + s]`, hue shift from
/// `[-hue, hue]` turns), applied with probability `prob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Jitter {
    pub prob: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl Default for Jitter {
    fn default() -> Self {
        Self {
            prob: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
        }
    }
}

/// Gaussian blur with a standard deviation drawn from `sigma` (pixels of the output size),
/// applied with probability `prob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Blur {
    pub prob: f32,
    pub sigma: [f32; 2],
}

impl Default for Blur {
    fn default() -> Self {
        Self {
            prob: 0.5,
            sigma: [0.1, 2.0],
        }
    }
}

/// The random transforms of training. With every field at its default, images are only
/// resized.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Random resized crop: the area fraction range of the crop (for example `[0.08, 1.0]`);
    /// aspect ratios from 3/4 to 4/3.
    pub crop_scale: Option<[f32; 2]>,
    /// Random translation: pad by this many pixels (zeros) and crop back to the size.
    pub pad_crop: usize,
    /// Probability of a horizontal flip.
    pub hflip: f32,
    pub jitter: Option<Jitter>,
    /// Probability of turning an image gray.
    pub grayscale: f32,
    pub blur: Option<Blur>,
}

impl Augment {
    /// The SimCLR recipe: crops down to 8 % of the area, flips, strong colour jitter,
    /// random grayscale and blur.
    pub fn contrastive() -> Self {
        Self {
            crop_scale: Some([0.08, 1.0]),
            pad_crop: 0,
            hflip: 0.5,
            jitter: Some(Jitter::default()),
            grayscale: 0.2,
            blur: Some(Blur::default()),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let prob = |name: &str, p: f32| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(format!("{name} must be a probability in [0, 1], found {p}"))
            }
        };
        if let Some([lo, hi]) = self.crop_scale {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return Err(format!(
                    "crop_scale must satisfy 0 < low <= high <= 1, found [{lo}, {hi}]"
                ));
            }
        }
        if self.pad_crop > 256 {
            return Err(format!(
                "pad_crop must be at most 256 pixels, found {}",
                self.pad_crop
            ));
        }
        prob("hflip", self.hflip)?;
        prob("grayscale", self.grayscale)?;
        if let Some(j) = &self.jitter {
            prob("jitter.prob", j.prob)?;
            for (name, v, max) in [
                ("jitter.brightness", j.brightness, 1.0),
                ("jitter.contrast", j.contrast, 1.0),
                ("jitter.saturation", j.saturation, 1.0),
                ("jitter.hue", j.hue, 0.5),
            ] {
                if !(0.0..=max).contains(&v) {
                    return Err(format!("{name} must be in [0, {max}], found {v}"));
                }
            }
        }
        if let Some(b) = &self.blur {
            prob("blur.prob", b.prob)?;
            if !(b.sigma[0] > 0.0 && b.sigma[0] <= b.sigma[1] && b.sigma[1] <= 50.0) {
                return Err(format!(
                    "blur.sigma must satisfy 0 < low <= high <= 50, found {:?}",
                    b.sigma
                ));
            }
        }
        Ok(())
    }
}

/// A generator for one image of one epoch.
pub fn image_rng(seed: u64, epoch: usize, position: usize) -> ChaCha8Rng {
    let mut z = seed
        ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

fn buffer(image: &Image) -> image::DynamicImage {
    let (w, h) = (image.width as u32, image.height as u32);
    let pixels = image.pixels.clone();
    let built = if image.channels == 1 {
        image::GrayImage::from_raw(w, h, pixels).map(image::DynamicImage::ImageLuma8)
    } else {
        image::RgbImage::from_raw(w, h, pixels).map(image::DynamicImage::ImageRgb8)
    };
    // The sizes come from the decoder, so the buffer always fits.
    built.unwrap_or_else(|| image::DynamicImage::new_luma8(w, h))
}

/// A crop box `(x, y, w, h)` of a random resized crop.
fn crop_box(rng: &mut ChaCha8Rng, w: usize, h: usize, scale: [f32; 2]) -> (u32, u32, u32, u32) {
    let area = (w * h) as f32;
    let (log_lo, log_hi) = ((3.0f32 / 4.0).ln(), (4.0f32 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let ratio = rng.random_range(log_lo..=log_hi).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            return (x as u32, y as u32, cw as u32, ch as u32);
        }
    }
    // Fall back to the largest centred crop of a permitted aspect ratio.
    let (cw, ch) = if w > h * 4 / 3 {
        (h * 4 / 3, h)
    } else if h > w * 4 / 3 {
        (w, w * 4 / 3)
    } else {
        (w, h)
    };
    (
        ((w - cw) / 2) as u32,
        ((h - ch) / 2) as u32,
        cw.max(1) as u32,
        ch.max(1) as u32,
    )
}

/// `size x size` planes in [0, 1], `channels` of them, from bytes `[h, w, c]`.
fn to_planes(img: &image::DynamicImage, channels: usize, size: usize) -> Vec<f32> {
    let n = size * size;
    let mut out = vec![0.0f32; channels * n];
    if channels == 1 {
        let gray = img.to_luma8();
        for (o, p) in out.iter_mut().zip(gray.as_raw()) {
            *o = *p as f32 / 255.0;
        }
    } else {
        let rgb = img.to_rgb8();
        for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * n + i] = px[c] as f32 / 255.0;
            }
        }
    }
    out
}

fn luma(planes: &[f32], n: usize, i: usize) -> f32 {
    0.299 * planes[i] + 0.587 * planes[n + i] + 0.114 * planes[2 * n + i]
}

fn jitter(planes: &mut [f32], channels: usize, n: usize, j: &Jitter, rng: &mut ChaCha8Rng) {
    let factor = |rng: &mut ChaCha8Rng, s: f32| {
        if s > 0.0 {
            rng.random_range(1.0 - s..=1.0 + s)
        } else {
            1.0
        }
    };
    let b = factor(rng, j.brightness);
    let c = factor(rng, j.contrast);
    let s = factor(rng, j.saturation);
    let hue = if j.hue > 0.0 {
        rng.random_range(-j.hue..=j.hue)
    } else {
        0.0
    };
    for v in planes.iter_mut() {
        *v = (*v * b).clamp(0.0, 1.0);
    }
    let mean = if channels == 3 {
        (0..n).map(|i| luma(planes, n, i)).sum::<f32>() / n as f32
    } else {
        planes.iter().sum::<f32>() / n as f32
    };
    for v in planes.iter_mut() {
        *v = ((*v - mean) * c + mean).clamp(0.0, 1.0);
    }
    if channels != 3 {
        return;
    }
    // Saturation towards gray, then a hue rotation in the YIQ plane.
    let (sin, cos) = (hue * std::f32::consts::TAU).sin_cos();
    for i in 0..n {
        let y = luma(planes, n, i);
        let mut rgb = [planes[i], planes[n + i], planes[2 * n + i]];
        for v in &mut rgb {
            *v = y + (*v - y) * s;
        }
        if hue != 0.0 {
            let yy = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
            let ii = 0.596 * rgb[0] - 0.274 * rgb[1] - 0.322 * rgb[2];
            let qq = 0.211 * rgb[0] - 0.523 * rgb[1] + 0.312 * rgb[2];
            let (i2, q2) = (ii * cos - qq * sin, ii * sin + qq * cos);
            rgb = [
                yy + 0.956 * i2 + 0.621 * q2,
                yy - 0.272 * i2 - 0.647 * q2,
                yy - 1.106 * i2 + 1.703 * q2,
            ];
        }
        for (c, v) in rgb.into_iter().enumerate() {
            planes[c * n + i] = v.clamp(0.0, 1.0);
        }
    }
}

/// Separable Gaussian blur of each `size x size` plane, edges reflected.
fn blur(planes: &mut [f32], size: usize, sigma: f32) {
    if size < 2 {
        return;
    }
    let radius = ((3.0 * sigma).ceil() as usize).clamp(1, size.saturating_sub(1).max(1));
    let mut kernel: Vec<f32> = (0..=2 * radius)
        .map(|k| {
            let d = k as f32 - radius as f32;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let reflect = |i: isize| -> usize {
        let last = size as isize - 1;
        let mut i = i;
        while i < 0 || i > last {
            i = if i < 0 { -i } else { 2 * last - i };
        }
        i as usize
    };
    let mut tmp = vec![0.0f32; size * size];
    for plane in planes.chunks_exact_mut(size * size) {
        for y in 0..size {
            for x in 0..size {
                let mut acc = 0.0;
                for (k, w) in kernel.iter().enumerate() {
                    acc += w * plane[y * size + reflect(x as isize + k as isize - radius as isize)];
                }
                tmp[y * size + x] = acc;
            }
        }
        for y in 0..size {
            for x in 0..size {
                let mut acc = 0.0;
                for (k, w) in kernel.iter().enumerate() {
                    acc += w * tmp[reflect(y as isize + k as isize - radius as isize) * size + x];
                }
                plane[y * size + x] = acc;
            }
        }
    }
}

/// One image as the model's normalised input `[channels, size, size]`: augmented with `rng`
/// when `augment` is given, otherwise only resized.
pub fn prepare(
    image: &Image,
    pre: &Preprocess,
    augment: Option<&Augment>,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let size = pre.size;
    let mut img = buffer(image);
    if let Some(scale) = augment.and_then(|a| a.crop_scale) {
        let (x, y, w, h) = crop_box(rng, image.width, image.height, scale);
        img = img.crop_imm(x, y, w, h);
    }
    if img.width() as usize != size || img.height() as usize != size {
        img = img.resize_exact(size as u32, size as u32, FilterType::Triangle);
    }
    let n = size * size;
    let mut planes = to_planes(&img, pre.channels, size);
    if let Some(a) = augment {
        if a.pad_crop > 0 {
            let p = a.pad_crop as isize;
            let dx = rng.random_range(-(p as i64)..=p as i64) as isize;
            let dy = rng.random_range(-(p as i64)..=p as i64) as isize;
            let src = planes.clone();
            for (c, plane) in planes.chunks_exact_mut(n).enumerate() {
                for y in 0..size as isize {
                    for x in 0..size as isize {
                        let (sx, sy) = (x + dx, y + dy);
                        let inside = sx >= 0 && sy >= 0 && sx < size as isize && sy < size as isize;
                        plane[(y * size as isize + x) as usize] = if inside {
                            src[c * n + (sy * size as isize + sx) as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
        if a.hflip > 0.0 && rng.random::<f32>() < a.hflip {
            for row in planes.chunks_exact_mut(size) {
                row.reverse();
            }
        }
        if let Some(j) = &a.jitter {
            if rng.random::<f32>() < j.prob {
                jitter(&mut planes, pre.channels, n, j, rng);
            }
        }
        if pre.channels == 3 && a.grayscale > 0.0 && rng.random::<f32>() < a.grayscale {
            for i in 0..n {
                let y = luma(&planes, n, i);
                for c in 0..3 {
                    planes[c * n + i] = y;
                }
            }
        }
        if let Some(b) = &a.blur {
            if rng.random::<f32>() < b.prob {
                let sigma = rng.random_range(b.sigma[0]..=b.sigma[1]);
                blur(&mut planes, size, sigma);
            }
        }
    }
    for (c, plane) in planes.chunks_exact_mut(n).enumerate() {
        let (m, s) = (pre.mean[c], pre.std[c]);
        for v in plane {
            *v = (*v - m) / s;
        }
    }
    planes
}

/// Prepares numbered jobs on worker threads, at most `lookahead` ahead of the consumer.
pub struct Prefetcher<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

struct Shared<T> {
    /// Finished jobs; `None` for a job whose closure panicked.
    ready: Mutex<HashMap<usize, Option<T>>>,
    filled: Condvar,
    /// The next job index a worker claims.
    next: AtomicUsize,
    /// The job the consumer waits for; workers stay within `lookahead` of it.
    wanted: Mutex<usize>,
    moved: Condvar,
    stop: AtomicBool,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts `workers` threads making jobs `start..end` with `make`.
    pub fn start(
        start: usize,
        end: usize,
        workers: usize,
        lookahead: usize,
        make: Arc<dyn Fn(usize) -> T + Send + Sync>,
    ) -> Self {
        let shared = Arc::new(Shared {
            ready: Mutex::new(HashMap::new()),
            filled: Condvar::new(),
            next: AtomicUsize::new(start),
            wanted: Mutex::new(start),
            moved: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let lookahead = lookahead.max(1);
        let workers = (0..workers.max(1))
            .map(|_| {
                let shared = shared.clone();
                let make = make.clone();
                std::thread::spawn(move || loop {
                    let job = shared.next.fetch_add(1, Ordering::SeqCst);
                    if job >= end {
                        return;
                    }
                    {
                        let mut wanted = shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
                        while job >= *wanted + lookahead && !shared.stop.load(Ordering::SeqCst) {
                            wanted = shared.moved.wait(wanted).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let value =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(job))).ok();
                    let mut ready = shared.ready.lock().unwrap_or_else(|e| e.into_inner());
                    ready.insert(job, value);
                    shared.filled.notify_all();
                })
            })
            .collect();
        Self { shared, workers }
    }

    /// Waits for job `index` and takes it. Jobs must be taken in order, within the range
    /// the prefetcher was started with. A job whose closure panicked panics here, in the
    /// caller, instead of leaving it waiting.
    pub fn take(&self, index: usize) -> T {
        {
            let mut wanted = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            *wanted = index;
            self.shared.moved.notify_all();
        }
        let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = ready.remove(&index) {
                return v.unwrap_or_else(|| panic!("preparing job {index} failed on a worker"));
            }
            ready = self
                .shared
                .filled
                .wait(ready)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.next.store(usize::MAX / 2, Ordering::SeqCst);
        {
            let _guard = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.moved.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Draws from Beta(alpha, alpha) (for mixup), through two Gamma draws.
pub fn beta_symmetric(rng: &mut ChaCha8Rng, alpha: f64) -> f64 {
    let x = gamma(rng, alpha);
    let y = gamma(rng, alpha);
    if x + y == 0.0 {
        0.5
    } else {
        x / (x + y)
    }
}

/// Gamma(shape, 1) by Marsaglia and Tsang, boosted for shapes below 1.
fn gamma(rng: &mut ChaCha8Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let (mut x, mut v);
        loop {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            x = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            v = 1.0 + c * x;
            if v > 0.0 {
                break;
            }
        }
        v = v * v * v;
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(size: usize) -> Image {
        let pixels = (0..size * size).map(|i| (i * 7 % 256) as u8).collect();
        Image::new(size, size, 1, pixels)
    }

    fn pre(size: usize, channels: usize) -> Preprocess {
        Preprocess {
            size,
            channels,
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
        }
    }

    #[test]
    fn plain_preparation_normalises_without_randomness() {
        let img = gray(8);
        let out = prepare(&img, &pre(8, 1), None, &mut image_rng(1, 0, 0));
        for (o, p) in out.iter().zip(&img.pixels) {
            assert!((o - (*p as f32 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        }
        // Gray to RGB repeats the plane.
        let rgb = prepare(&img, &pre(8, 3), None, &mut image_rng(1, 0, 0));
        assert_eq!(&rgb[..64], &rgb[64..128]);
    }

    #[test]
    fn augmentation_is_seeded_and_changes_images() {
        let img = Image::new(
            20,
            16,
            3,
            (0..20 * 16 * 3).map(|i| (i * 13 % 256) as u8).collect(),
        );
        let a = Augment::contrastive();
        a.validate().unwrap();
        let p = pre(12, 3);
        let one = prepare(&img, &p, Some(&a), &mut image_rng(5, 2, 9));
        let again = prepare(&img, &p, Some(&a), &mut image_rng(5, 2, 9));
        let other = prepare(&img, &p, Some(&a), &mut image_rng(5, 2, 10));
        assert_eq!(one, again);
        assert_ne!(one, other);
        assert_eq!(one.len(), 3 * 12 * 12);
        assert!(one
            .iter()
            .all(|v| v.is_finite() && (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn flips_and_translations_move_pixels_as_expected() {
        let img = gray(6);
        let p = pre(6, 1);
        let flip = Augment {
            hflip: 1.0,
            ..Augment::default()
        };
        let plain = prepare(&img, &p, None, &mut image_rng(0, 0, 0));
        let flipped = prepare(&img, &p, Some(&flip), &mut image_rng(0, 0, 0));
        for y in 0..6 {
            for x in 0..6 {
                assert_eq!(flipped[y * 6 + x], plain[y * 6 + 5 - x]);
            }
        }
        let shift = Augment {
            pad_crop: 2,
            ..Augment::default()
        };
        let shifted = prepare(&img, &p, Some(&shift), &mut image_rng(3, 0, 0));
        // Still a permutation of the original plus padding (value of 0 -> -1 normalised).
        let kept = shifted.iter().filter(|v| plain.contains(v)).count();
        assert!(kept >= 16, "{kept}");
    }

    #[test]
    fn blur_keeps_a_constant_image_and_smooths_an_edge() {
        let mut planes = vec![0.25f32; 36];
        blur(&mut planes, 6, 1.0);
        assert!(planes.iter().all(|v| (v - 0.25).abs() < 1e-6));
        let mut edge: Vec<f32> = (0..36).map(|i| if i % 6 < 3 { 0.0 } else { 1.0 }).collect();
        blur(&mut edge, 6, 1.0);
        assert!(edge[2] > 0.0 && edge[3] < 1.0 && edge[2] < edge[3]);
    }

    #[test]
    fn bad_settings_are_named() {
        let a = Augment {
            crop_scale: Some([0.5, 0.2]),
            ..Augment::default()
        };
        assert!(a.validate().unwrap_err().contains("crop_scale"));
        let a = Augment {
            hflip: 2.0,
            ..Augment::default()
        };
        assert!(a.validate().unwrap_err().contains("hflip"));
        let p = Preprocess {
            mean: vec![0.5],
            ..pre(8, 3)
        };
        assert!(p.validate().unwrap_err().contains("image_mean"));
    }

    #[test]
    fn prefetched_jobs_arrive_in_order_whatever_the_threads() {
        let make: Arc<dyn Fn(usize) -> usize + Send + Sync> = Arc::new(|i| i * i);
        let f = Prefetcher::start(3, 40, 3, 4, make);
        for i in 3..40 {
            assert_eq!(f.take(i), i * i);
        }
        // Dropped early: the workers stop.
        let make: Arc<dyn Fn(usize) -> usize + Send + Sync> = Arc::new(|i| i);
        let f = Prefetcher::start(0, 1_000_000, 2, 2, make);
        assert_eq!(f.take(0), 0);
        drop(f);
    }

    #[test]
    fn a_panicking_job_surfaces_in_the_caller_and_tiny_images_blur() {
        let make: Arc<dyn Fn(usize) -> usize + Send + Sync> = Arc::new(|i| {
            assert!(i != 1, "job 1 fails");
            i
        });
        let f = Prefetcher::start(0, 3, 2, 2, make);
        assert_eq!(f.take(0), 0);
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.take(1)));
        assert!(failed.is_err());
        let mut one = vec![0.5f32];
        blur(&mut one, 1, 1.0);
        assert_eq!(one, vec![0.5]);
        let a = Augment {
            pad_crop: 1000,
            ..Augment::default()
        };
        assert!(a.validate().unwrap_err().contains("pad_crop"));
    }

    #[test]
    fn beta_draws_average_one_half() {
        let mut rng = image_rng(1, 0, 0);
        let draws: Vec<f64> = (0..4000).map(|_| beta_symmetric(&mut rng, 0.4)).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.03, "{mean}");
        assert!(draws.iter().all(|d| (0.0..=1.0).contains(d)));
        // Beta(0.4, 0.4) puts most mass near 0 and 1.
        let extreme = draws.iter().filter(|d| **d < 0.1 || **d > 0.9).count();
        assert!(extreme > draws.len() / 3, "{extreme}");
    }
}
