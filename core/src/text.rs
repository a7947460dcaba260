//! Bounded text: what errors, logs and dead-letter records quote of untrusted input.

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn cap(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::cap;

    #[test]
    fn cap_cuts_on_a_character_boundary() {
        assert_eq!(cap("ééé", 3), "é");
        assert_eq!(cap("abc", 10), "abc");
        assert_eq!(cap("abc", 0), "");
    }
}
