//! The Internet checksum (RFC 1071) of headers the programs write: one's-complement sums of
//! 16-bit words, folded. Shared by the DNS responder's answers and the ICMP the path MTU check
//! sends.

/// The 16-bit big-endian words of `bytes` (an even number of them), summed.
#[inline(always)]
pub fn words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Folds a one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
