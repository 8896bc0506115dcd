//! Kubernetes' own value grammars, checked as the API server checks them, so that a `kubernetes`
//! runner's mistakes are reported by `validate` with their spans rather than by the cluster at run
//! time: resource quantities and names, label keys and values, DNS names.

/// The most a quantity may be, in its base unit: Kubernetes caps quantities at 2^63-1.
const MAX_QUANTITY: u128 = i64::MAX as u128;

/// Digits a quantity may have, not counting leading and trailing zeros: more than int64 holds,
/// few enough that the exact arithmetic below cannot overflow.
const MAX_DIGITS: usize = 20;

/// A Kubernetes quantity (`500m`, `1.5`, `512Mi`, `1G`, `1e3`), in thousandths of its unit, exact.
/// Kubernetes keeps three decimal places and rounds finer values up (`0.1m` is `1m`); so does this.
pub fn parse_quantity(text: &str) -> Result<u128, String> {
    if text.is_empty() {
        return Err("the quantity is empty".into());
    }
    if text.trim() != text || text.contains(char::is_whitespace) {
        return Err(format!("`{text}` has spaces in it"));
    }
    if !text.is_ascii() {
        return Err(format!("`{text}` is not a quantity"));
    }
    let unsigned = match text.as_bytes()[0] {
        b'-' => return Err(format!("`{text}` is negative")),
        b'+' => &text[1..],
        _ => text,
    };
    let number_len = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(format!("`{text}` has no number"));
    }
    if fraction.contains('.') {
        return Err(format!("`{text}` is not a number"));
    }
    let (exp10, exp2) = quantity_suffix(suffix).ok_or_else(|| {
        if suffix.starts_with(['e', 'E']) && suffix.len() > 1 {
            format!("`{text}` has an invalid exponent")
        } else {
            format!("`{text}` has an unknown suffix `{suffix}`")
        }
    })?;
    // The value is digits × 10^(exp10 - fraction digits) × 2^exp2, in units; × 10^3 in thousandths.
    let digits = format!("{whole}{fraction}");
    let significant = digits.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.is_empty() {
        return Ok(0);
    }
    if trimmed.len() > MAX_DIGITS {
        return Err(format!(
            "`{text}` has more than {MAX_DIGITS} significant digits"
        ));
    }
    let too_large = || format!("`{text}` is too large (at most 2^63-1)");
    let mantissa: u128 = trimmed.parse().map_err(|_| too_large())?;
    let zeros = (significant.len() - trimmed.len()) as i64;
    let exp10 = exp10 + zeros - fraction.len() as i64 + 3;
    // mantissa < 10^20 < 2^67 and exp2 ≤ 60: the product fits in 128 bits.
    let scaled = mantissa << exp2;
    let thousandths = if exp10 >= 0 {
        u32::try_from(exp10)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .and_then(|p| scaled.checked_mul(p))
            .ok_or_else(too_large)?
    } else {
        match u32::try_from(-exp10)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
        {
            Some(divisor) => scaled.div_ceil(divisor),
            // Finer than 10^-38 of a thousandth: rounded up, as Kubernetes does.
            None => 1,
        }
    };
    if thousandths > MAX_QUANTITY * 1000 {
        return Err(too_large());
    }
    Ok(thousandths)
}

/// A quantity's suffix as (power of ten, power of two): `Mi` (0, 20), `k` (3, 0), `e-3` (-3, 0).
fn quantity_suffix(suffix: &str) -> Option<(i64, u32)> {
    let known = match suffix {
        "" => (0, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        _ => {
            // `e3`, `E-2`, `e+6`: a decimal exponent (`E` alone is exa, above).
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Beyond ±10^6 the value is out of range (or zero) whatever the digits; saturate.
            let value: i64 = digits.parse().unwrap_or(i64::MAX).min(1_000_000);
            return Some((
                if exponent.starts_with('-') {
                    -value
                } else {
                    value
                },
                0,
            ));
        }
    };
    Some(known)
}

/// What a resource name is, for the checks that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceName {
    /// `cpu`, `memory`, `ephemeral-storage`: may be overcommitted (a request below its limit).
    Standard,
    /// `hugepages-<size>` and extended resources (`nvidia.com/gpu`): whole numbers, not
    /// overcommitted (a request needs an equal limit).
    NotOvercommitted,
}

/// The resources a container may request: `cpu`, `memory`, `ephemeral-storage`,
/// `hugepages-<size>`, or an extended resource `<domain>/<name>` outside `kubernetes.io`.
pub fn check_resource_name(name: &str) -> Result<ResourceName, String> {
    match name {
        "cpu" | "memory" | "ephemeral-storage" => return Ok(ResourceName::Standard),
        _ => {}
    }
    if let Some(size) = name.strip_prefix("hugepages-") {
        return match parse_quantity(size) {
            Ok(_) => Ok(ResourceName::NotOvercommitted),
            Err(_) => Err(format!("`{name}`: `{size}` is not a page size")),
        };
    }
    let Some((domain, _)) = name.split_once('/') else {
        return Err(format!("`{name}` is not a resource Kubernetes knows"));
    };
    check_qualified_name(name)?;
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        return Err(format!(
            "`{name}`: the `kubernetes.io` domain is for Kubernetes' own resources"
        ));
    }
    Ok(ResourceName::NotOvercommitted)
}

/// The name part of a qualified name: at most 63 characters, alphanumeric at both ends, with
/// `-`, `_` and `.` between.
fn check_name_part(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > 63 {
        return Err(format!(
            "{what} `{name}` is longer than 63 characters ({})",
            name.len()
        ));
    }
    let inner_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ends_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !name.chars().all(inner_ok) {
        return Err(format!(
            "{what} `{name}` has characters other than letters, digits, `-`, `_` and `.`"
        ));
    }
    if !ends_ok {
        return Err(format!(
            "{what} `{name}` must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// A label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (`app`, `app.kubernetes.io/name`).
pub fn check_qualified_name(key: &str) -> Result<(), String> {
    match key.split_once('/') {
        None => check_name_part(key, "the key"),
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err(format!("`{key}` has an empty prefix before `/`"));
            }
            check_dns_subdomain(prefix).map_err(|e| format!("the prefix of `{key}`: {e}"))?;
            if name.contains('/') {
                return Err(format!("`{key}` has more than one `/`"));
            }
            check_name_part(name, "the name").map_err(|e| format!("`{key}`: {e}"))
        }
    }
}

/// A label value: empty, or at most 63 characters, alphanumeric at both ends, with `-`, `_` and
/// `.` between.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name_part(value, "the value")
}

/// A DNS-1123 label (a namespace): at most 63 lowercase letters, digits and `-`, alphanumeric at
/// both ends.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > 63 {
        return Err(format!("`{name}` is longer than 63 characters"));
    }
    let lower_alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !name.chars().all(|c| lower_alnum(c) || c == '-') {
        return Err(format!(
            "`{name}` has characters other than lowercase letters, digits and `-`"
        ));
    }
    if !name.starts_with(lower_alnum) || !name.ends_with(lower_alnum) {
        return Err(format!(
            "`{name}` must start and end with a lowercase letter or digit"
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain (a Secret's or service account's name, a key's prefix): at most 253
/// characters, DNS labels joined by `.`.
pub fn check_dns_subdomain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > 253 {
        return Err(format!("`{name}` is longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("`{name}` has an empty part between dots"));
        }
        check_dns_label(label).map_err(|_| {
            format!(
                "`{name}` must be lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit"
            )
        })?;
    }
    Ok(())
}

/// A container environment variable's name, as Kubernetes 1.20 accepts it: letters, digits, `_`,
/// `-` and `.`, not starting with a digit.
pub fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a variable name (letters, digits, `_`, `-`, `.`, not starting with a digit)"
        ))
    }
}

/// The name of a git remote, as `git remote add` accepts it and no option can be mistaken for it:
/// no spaces or control characters, none of `~^:?*[\`, no `..` or `@{`, not starting with `-` or
/// `.`, not ending with `.`, `/` or `.lock`.
pub fn check_remote_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the remote's name is empty".into());
    }
    if name.starts_with('-') {
        return Err(format!("`{name}` starts with `-`"));
    }
    let bad_char = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(*c));
    if let Some(c) = bad_char {
        return Err(format!("`{name}` has the character {c:?}"));
    }
    let bad_form = name.starts_with(['.', '/'])
        || name.ends_with(['.', '/'])
        || name.ends_with(".lock")
        || name.contains("..")
        || name.contains("@{")
        || name.contains("//")
        || name.contains("/.");
    if bad_form {
        return Err(format!("`{name}` is not a remote's name git accepts"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_read_as_kubernetes_reads_them() {
        let units = |n: u128| n * 1000;
        assert_eq!(parse_quantity("500m"), Ok(500));
        assert_eq!(parse_quantity("1"), Ok(units(1)));
        assert_eq!(parse_quantity("0.5"), Ok(500));
        assert_eq!(parse_quantity(".5"), Ok(500));
        assert_eq!(parse_quantity("1."), Ok(units(1)));
        assert_eq!(parse_quantity("+2"), Ok(units(2)));
        assert_eq!(parse_quantity("512Mi"), Ok(units(512 << 20)));
        assert_eq!(parse_quantity("1Gi"), Ok(units(1 << 30)));
        assert_eq!(parse_quantity("1.5Gi"), Ok(units(3 << 29)));
        assert_eq!(parse_quantity("1G"), Ok(units(1_000_000_000)));
        assert_eq!(parse_quantity("1000000"), Ok(units(1_000_000)));
        assert_eq!(parse_quantity("1e3"), Ok(units(1000)));
        assert_eq!(parse_quantity("1E3"), Ok(units(1000)));
        assert_eq!(parse_quantity("5e-1"), Ok(500));
        assert_eq!(parse_quantity("1E"), Ok(units(10u128.pow(18))));
        assert_eq!(parse_quantity("1k"), Ok(units(1000)));
        assert_eq!(parse_quantity("0"), Ok(0));
        assert_eq!(parse_quantity("000.000Mi"), Ok(0));
        // Finer than a thousandth rounds up, as Kubernetes rounds `0.1m` to `1m`.
        assert_eq!(parse_quantity("0.1m"), Ok(1));
        assert_eq!(parse_quantity("1n"), Ok(1));
        assert_eq!(parse_quantity("1e-999"), Ok(1));
        // Equal values written differently are equal, exactly.
        assert_eq!(parse_quantity("0.1"), parse_quantity("100m"));
        assert_eq!(parse_quantity("1Gi"), parse_quantity("1024Mi"));
        assert_eq!(
            parse_quantity("8Ei"),
            Err("`8Ei` is too large (at most 2^63-1)".into())
        );
        assert!(parse_quantity("7Ei").is_ok());
        for bad in [
            "",
            " ",
            " 1",
            "1 ",
            "1 Gi",
            "\t1",
            "-1",
            "--1",
            "Mi",
            "m",
            ".",
            "..5",
            "1.2.3",
            "1K",
            "1mi",
            "1MB",
            "1Gib",
            "1e",
            "1e+",
            "1e3.5",
            "1ee3",
            "1e999",
            "1e99999999999999",
            "99999999999999999999999",
            "1Ei Ei",
            "１",
            "1µ",
            "1e٣",
            "0x10",
            "1_000",
            "∞",
            "NaN",
            "inf",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} was accepted");
        }
        // Digits beyond what int64 holds, but a value in range: refused by digits, not overflow.
        assert!(parse_quantity("0.000000000000000000000001").is_ok());
        assert!(parse_quantity("1.00000000000000000000001").is_err());
    }

    #[test]
    fn resource_names() {
        for ok in ["cpu", "memory", "ephemeral-storage"] {
            assert_eq!(check_resource_name(ok), Ok(ResourceName::Standard));
        }
        for ok in ["nvidia.com/gpu", "hugepages-2Mi", "example.org/fpga-x"] {
            assert_eq!(
                check_resource_name(ok),
                Ok(ResourceName::NotOvercommitted),
                "{ok}"
            );
        }
        for bad in [
            "",
            "cpus",
            "mem",
            "gpu",
            "CPU",
            "/gpu",
            "nvidia.com/",
            "Nvidia.com/gpu",
            "kubernetes.io/x",
            "node.kubernetes.io/x",
            "a/b/c",
            "hugepages-",
            "hugepages-big",
            "nvidia.com/g pu",
            "nvidia.com/gpü",
        ] {
            assert!(check_resource_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn label_keys_and_values_as_kubernetes_validates_them() {
        let sixty_three = "a".repeat(63);
        let sixty_four = "a".repeat(64);
        for ok in [
            "app",
            "app.kubernetes.io/name",
            "team_a",
            "A-b.c_D",
            "x/y",
            "example.com/Build-ID",
            sixty_three.as_str(),
        ] {
            assert_eq!(check_qualified_name(ok), Ok(()), "{ok}");
        }
        let long_prefix = format!("{}/a", "a.".repeat(127));
        for bad in [
            "",
            "-a",
            "a-",
            "_a",
            "a.",
            "a b",
            " a",
            "a\n",
            "é",
            "app/",
            "/app",
            "a/b/c",
            "Example.com/a",
            "ex_ample.com/a",
            "example..com/a",
            "-example.com/a",
            sixty_four.as_str(),
            long_prefix.as_str(),
        ] {
            assert!(check_qualified_name(bad).is_err(), "{bad:?} was accepted");
        }
        let too_long_key = format!("x/{sixty_four}");
        assert!(check_qualified_name(&too_long_key).is_err());
        for ok in ["", "v1", "a.b-c_d", "X", sixty_three.as_str()] {
            assert_eq!(check_label_value(ok), Ok(()), "{ok}");
        }
        for bad in [
            "-a",
            "a-",
            ".a",
            "a b",
            " ",
            "ü",
            "a/b",
            "a\0",
            sixty_four.as_str(),
        ] {
            assert!(check_label_value(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn dns_names_env_names_and_remotes() {
        for ok in ["ci", "a", "team-1", "0x", &"a".repeat(63)] {
            assert_eq!(check_dns_label(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "CI",
            "a_b",
            "a.b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(check_dns_label(bad).is_err(), "{bad:?} was accepted");
        }
        for ok in ["regcred", "my.reg-cred", "a.b.c"] {
            assert_eq!(check_dns_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "A", "a_b", "a b", &"a.".repeat(127)] {
            assert!(check_dns_subdomain(bad).is_err(), "{bad:?} was accepted");
        }
        for ok in ["PATH", "_X", "a.b-c", "x1"] {
            assert_eq!(check_env_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1X", "A B", "A=B", "É", "A\n"] {
            assert!(check_env_name(bad).is_err(), "{bad:?} was accepted");
        }
        for ok in ["origin", "upstream", "team/fork", "my-remote.2"] {
            assert_eq!(check_remote_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-o",
            "--upload-pack=x",
            "a b",
            "a\tb",
            "a:b",
            "a..b",
            ".a",
            "a.",
            "a/",
            "/a",
            "a//b",
            "a/.b",
            "a.lock",
            "a@{1}",
            "a~1",
            "a^",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "a\u{7f}",
        ] {
            assert!(check_remote_name(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
