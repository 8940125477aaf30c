//! The RDMA endpoint: the data of an `Rdma` endpoint in a handshake.
//!
//! ```text
//! rails: u16 count, then per rail: index u16, port u8, mtu u16 (bytes), lid u16, gid [16]
//! qps:   u16 count, then per QP:   rail u16, qpn u32, psn u32, peer_rail u16
//! ```
//!
//! An initiator lists one QP per lane with `peer_rail = NO_RAIL`; the target answers with the
//! QP it connected to each, in the same order, naming the initiator's rail in `peer_rail`.

use super::*;

/// Marks "no rail chosen yet" in [`QpInfo::peer_rail`].
pub const NO_RAIL: u16 = u16::MAX;
/// Most rails one RDMA endpoint may list.
pub const MAX_RAILS: usize = 64;
/// Most queue pairs one RDMA endpoint may list.
pub const MAX_QPS: usize = 4096;

/// One rail (HCA port) as a peer must know it to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RailInfo {
    /// Rail index at its owner.
    pub index: u16,
    /// HCA port number.
    pub port: u8,
    /// Active MTU in bytes (256..4096).
    pub mtu: u16,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID the rail uses.
    pub gid: [u8; 16],
}

/// One RC queue pair offered or answered in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// Rail of the sender's QP.
    pub rail: u16,
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// The other side's rail it pairs with ([`NO_RAIL`] in an offer).
    pub peer_rail: u16,
}

/// The whole RDMA endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaEndpoint {
    /// The sender's rails.
    pub rails: Vec<RailInfo>,
    /// Its queue pairs, one per lane.
    pub qps: Vec<QpInfo>,
}

impl RdmaEndpoint {
    /// Encodes the endpoint (the opaque data of an `Rdma` [`Endpoint`]).
    pub fn encode(&self) -> Vec<u8> {
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

    /// Decodes and validates an endpoint from peer input, exactly.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let n = r.u16("rdma endpoint")? as usize;
        check_max("rdma rails", n as u64, MAX_RAILS as u64)?;
        let mut rails = Vec::with_capacity(n.min(r.remaining() / 23));
        for _ in 0..n {
            let index = r.u16("rdma endpoint")?;
            let port = r.u8("rdma endpoint")?;
            let mtu = r.u16("rdma endpoint")?;
            let lid = r.u16("rdma endpoint")?;
            let gid: [u8; 16] = r.array("rdma endpoint")?;
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
        let m = r.u16("rdma endpoint")? as usize;
        check_max("rdma qps", m as u64, MAX_QPS as u64)?;
        let mut qps = Vec::with_capacity(m.min(r.remaining() / 12));
        for _ in 0..m {
            let q = QpInfo {
                rail: r.u16("rdma endpoint")?,
                qpn: r.u32("rdma endpoint")?,
                psn: r.u32("rdma endpoint")? & 0x00ff_ffff,
                peer_rail: r.u16("rdma endpoint")?,
            };
            if !rails.iter().any(|x| x.index == q.rail) {
                return Err(WireError::Malformed {
                    what: "rdma qp",
                    detail: format!("unknown rail {}", q.rail),
                });
            }
            qps.push(q);
        }
        r.finish("rdma endpoint")?;
        Ok(RdmaEndpoint { rails, qps })
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
