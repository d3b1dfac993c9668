//! POSIX `sh` quoting (pure), shared by `resolve -o env` and the `toenv` template filter, so
//! that a `.env` file written either way reads back byte for byte with `set -a; . ./.env`.

/// Whether `name` can be a shell variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_variable_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Quotes a value for `sh`: between single quotes every byte is literal — `$`, backticks,
/// backslashes, newlines and carriage returns included —, and a `'` is written as `'\''`
/// (close the quote, an escaped quote, open it again).
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}
