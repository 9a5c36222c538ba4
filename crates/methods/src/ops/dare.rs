//! DARE's random drop decision (Yu et al. 2024, arXiv:2311.03099):
//! [`dare_keep`] and its integer form [`dare_limit`].

/// DARE's keep decision (Yu et al. 2024, arXiv:2311.03099) for one entry:
/// kept with probability `density`, from one `next_u32` of the entry's
/// reproducible stream ([`TensorContext::rng`](crate::TensorContext::rng)
/// positioned at the entry). See [`crate::rng::keep`].
#[inline]
pub fn dare_keep(draw: u32, density: f64) -> bool {
    // Same rule as `rng::keep`, written out so that it inlines and vectorises.
    (draw as f64) < density * 4_294_967_296.0
}

/// [`dare_keep`] as an integer comparison: `Some(l)` when the draws kept at
/// `density` are exactly those `≤ l`, `None` when none is kept. (`u < T` for
/// an integer `u` and real `T = density · 2³²` is `u < ⌈T⌉`, and `density ·
/// 2³²` is exact in `f64`.) Faster in bulk than converting every draw.
pub fn dare_limit(density: f64) -> Option<u32> {
    let t = (density * 4_294_967_296.0).ceil();
    if t.is_nan() || t <= 0.0 {
        None
    } else if t >= 4_294_967_296.0 {
        Some(u32::MAX)
    } else {
        Some(t as u32 - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dare_limit_is_the_keep_rule() {
        let third = 1.0 / 3.0;
        for p in [
            0.0,
            -0.5,
            1e-300,
            1e-9,
            2.0f64.powi(-32),
            third,
            0.25,
            0.5,
            0.7,
            0.999_999,
            1.0 - 2.0f64.powi(-33),
            1.0,
            1.5,
            f64::NAN,
        ] {
            let t = p * 4_294_967_296.0;
            let mut draws = vec![
                0u32,
                1,
                2,
                1 << 30,
                1 << 31,
                3_000_000_000,
                u32::MAX - 1,
                u32::MAX,
            ];
            if t.is_finite() && (1.0..4_294_967_295.0).contains(&t) {
                let f = t.floor() as u32;
                draws.extend([f - 1, f, f + 1]);
            }
            for u in draws {
                let fast = dare_limit(p).is_some_and(|l| u <= l);
                assert_eq!(fast, dare_keep(u, p), "u={u} p={p}");
            }
        }
    }

    #[test]
    fn dare_keep_is_the_rng_keep_rule() {
        for p in [0.0, 1e-9, 0.25, 0.5, 0.7, 0.999_999, 1.0, 1.5] {
            for u in [
                0u32,
                1,
                1 << 30,
                1 << 31,
                3_000_000_000,
                u32::MAX - 1,
                u32::MAX,
            ] {
                assert_eq!(dare_keep(u, p), crate::rng::keep(u, p), "u={u} p={p}");
            }
        }
    }
}
