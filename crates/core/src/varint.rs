//! LEB128 unsigned varints, the integer encoding of records and dictionaries.

/// Appends `v` as an unsigned LEB128 varint (7 bits a byte, low first; 1–10 bytes).
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
