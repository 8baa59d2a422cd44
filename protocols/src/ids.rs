//! The rule for container, exec and sandbox ids: the agent API and the stdio stream
//! header carry them, and the agent uses them in paths and cgroup names. The agent
//! checks the id of each sandbox, container and exec it is asked to create; the shim
//! checks the container and exec ids containerd sends it before any VM or mount work,
//! so a bad id is refused before a VM boots for it.

use crate::stdio::MAX_ID_LEN;

/// Why `check_id` refuses an id longer than `MAX_ID_LEN` bytes.
const TOO_LONG: &str = "it is longer than 256 bytes";

/// Checks an id: 1 to `MAX_ID_LEN` bytes (the stdio stream header's limit) of ASCII
/// letters, digits and `_ - . +`, not starting with `.` (so never `.` or `..`). The
/// error says why, worded to follow "id ... is invalid: ".
pub fn check_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("it is empty");
    }
    if id.len() > MAX_ID_LEN {
        return Err(TOO_LONG);
    }
    if id.starts_with('.') {
        return Err("it must not start with '.'");
    }
    if !id.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b'+')) {
        return Err("only letters, digits and _ - . + are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert_eq!(check_id("abc-1.2_x+y"), Ok(()));
        assert_eq!(check_id(&"x".repeat(MAX_ID_LEN)), Ok(()));
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ünï", "a\0b", "a\nb"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_id(&"x".repeat(MAX_ID_LEN + 1)), Err(TOO_LONG));
        assert!(TOO_LONG.contains(&MAX_ID_LEN.to_string()));
    }
}
