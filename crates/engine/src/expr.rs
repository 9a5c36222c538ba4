//! The expression language (`base + 0.5 * ((legal - base) + (recipe - base))`).
