//! The RDMA endpoint carried in the handshake: the sender's rails and its queue pairs.
//!
//! Pure codec (little-endian); the decoder takes peer input and rejects anything malformed.
//!
//! ```text
//! rails: u16 count, then per rail: index u16, port u8, mtu u16 (bytes), lid u16, gid [16]
//! qps:   u16 count, then per QP:   rail u16, qpn u32, psn u32, peer_rail u16
//! ```
//! An initiator lists one QP per lane with `peer_rail = NO_RAIL`; the target answers with
//! the QP it connected to each, in the same order, naming the initiator's rail in `peer_rail`.

use crate::wire::WireError;

/// Marks "no rail chosen yet" in [`QpInfo::peer_rail`].
pub(crate) const NO_RAIL: u16 = u16::MAX;
const MAX_RAILS: usize = 64;
const MAX_QPS: usize = 4096;

/// One rail (HCA port) as a peer must know it to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RailInfo {
    pub(crate) index: u16,
    pub(crate) port: u8,
    pub(crate) mtu: u16,
    pub(crate) lid: u16,
    pub(crate) gid: [u8; 16],
}

/// One RC queue pair offered or answered in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QpInfo {
    pub(crate) rail: u16,
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    pub(crate) peer_rail: u16,
}

/// The whole RDMA endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RdmaEndpoint {
    pub(crate) rails: Vec<RailInfo>,
    pub(crate) qps: Vec<QpInfo>,
}

impl RdmaEndpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.rails.len() * 23 + self.qps.len() * 12);
        out.extend_from_slice(&(self.rails.len() as u16).to_le_bytes());
        for r in &self.rails {
            out.extend_from_slice(&r.index.to_le_bytes());
            out.push(r.port);
            out.extend_from_slice(&r.mtu.to_le_bytes());
            out.extend_from_slice(&r.lid.to_le_bytes());
            out.extend_from_slice(&r.gid);
        }
        out.extend_from_slice(&(self.qps.len() as u16).to_le_bytes());
        for q in &self.qps {
            out.extend_from_slice(&q.rail.to_le_bytes());
            out.extend_from_slice(&q.qpn.to_le_bytes());
            out.extend_from_slice(&q.psn.to_le_bytes());
            out.extend_from_slice(&q.peer_rail.to_le_bytes());
        }
        out
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader { buf, at: 0 };
        let n = r.u16()? as usize;
        if n > MAX_RAILS {
            return Err(WireError::TooLarge {
                what: "rdma rails",
                len: n as u64,
                max: MAX_RAILS as u64,
            });
        }
        let mut rails = Vec::with_capacity(n.min(buf.len() / 23));
        for _ in 0..n {
            let index = r.u16()?;
            let port = r.u8()?;
            let mtu = r.u16()?;
            let lid = r.u16()?;
            let gid: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
            if !matches!(mtu, 256 | 512 | 1024 | 2048 | 4096) {
                return Err(WireError::Malformed {
                    what: "rdma rail",
                    detail: format!("mtu {mtu}"),
                });
            }
            if rails.iter().any(|x: &RailInfo| x.index == index) {
                return Err(WireError::Malformed {
                    what: "rdma rail",
                    detail: format!("duplicate rail {index}"),
                });
            }
            rails.push(RailInfo {
                index,
                port,
                mtu,
                lid,
                gid,
            });
        }
        let m = r.u16()? as usize;
        if m > MAX_QPS {
            return Err(WireError::TooLarge {
                what: "rdma qps",
                len: m as u64,
                max: MAX_QPS as u64,
            });
        }
        let mut qps = Vec::with_capacity(m.min(buf.len() / 12));
        for _ in 0..m {
            let q = QpInfo {
                rail: r.u16()?,
                qpn: r.u32()?,
                psn: r.u32()? & 0x00ff_ffff,
                peer_rail: r.u16()?,
            };
            if !rails.iter().any(|x| x.index == q.rail) {
                return Err(WireError::Malformed {
                    what: "rdma qp",
                    detail: format!("unknown rail {}", q.rail),
                });
            }
            qps.push(q);
        }
        if r.at != buf.len() {
            return Err(WireError::TrailingBytes {
                what: "rdma endpoint",
                count: buf.len() - r.at,
            });
        }
        Ok(RdmaEndpoint { rails, qps })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let got = self.buf.len() - self.at;
        if got < n {
            return Err(WireError::Truncated {
                what: "rdma endpoint",
                needed: n,
                got,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RdmaEndpoint {
        let gid = |n: u8| {
            let mut g = [0u8; 16];
            g[10] = 0xff;
            g[11] = 0xff;
            g[12..].copy_from_slice(&[198, 18, 0, n]);
            g
        };
        RdmaEndpoint {
            rails: vec![
                RailInfo {
                    index: 0,
                    port: 1,
                    mtu: 4096,
                    lid: 0,
                    gid: gid(1),
                },
                RailInfo {
                    index: 1,
                    port: 1,
                    mtu: 1024,
                    lid: 7,
                    gid: gid(2),
                },
            ],
            qps: vec![
                QpInfo {
                    rail: 0,
                    qpn: 17,
                    psn: 0x12345,
                    peer_rail: NO_RAIL,
                },
                QpInfo {
                    rail: 1,
                    qpn: 18,
                    psn: 0xabcdef,
                    peer_rail: 0,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        assert_eq!(RdmaEndpoint::decode(&e.encode()).unwrap(), e);
        assert_eq!(
            RdmaEndpoint::decode(&RdmaEndpoint::default().encode()).unwrap(),
            RdmaEndpoint::default()
        );
    }

    #[test]
    fn rejects_bad_input() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(RdmaEndpoint::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(matches!(
            RdmaEndpoint::decode(&extra),
            Err(WireError::TrailingBytes { .. })
        ));
        let mut bad_mtu = sample();
        bad_mtu.rails[0].mtu = 1500;
        assert!(matches!(
            RdmaEndpoint::decode(&bad_mtu.encode()),
            Err(WireError::Malformed { .. })
        ));
        let mut bad_rail = sample();
        bad_rail.qps[0].rail = 9;
        assert!(matches!(
            RdmaEndpoint::decode(&bad_rail.encode()),
            Err(WireError::Malformed { .. })
        ));
        let mut dup = sample();
        dup.rails[1].index = 0;
        dup.qps[1].rail = 0;
        assert!(matches!(
            RdmaEndpoint::decode(&dup.encode()),
            Err(WireError::Malformed { .. })
        ));
        assert!(matches!(
            RdmaEndpoint::decode(&[0xff, 0xff]),
            Err(WireError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = RdmaEndpoint::decode(&bytes);
        }
    }
}
