# The guest's RoCE fabric. Sourced by stage2.sh (and by ../lib.sh for the module list);
# defines things, runs nothing.
#
# For device suffixes X1 X2 ... (default A0 A1 B0 B1), device number N = 1, 2, ...:
#
#    rxeX      rdma link add rxeX type rxe netdev vX
#     vX       veth, 198.18.0.N/24, MAC 02:4b:56:54:00:NN, MTU 4200 (rxe path MTU 4096)
#     pX       its peer, a port of br-kvt
#   br-kvt     one bridge: every device reaches every other one over a real (veth) wire
#
# rdma_rxe (6.1) has its UDP port 4791 socket in the initial network namespace only, so all
# the netdevs share one namespace and every fabric address is local. Without help the kernel
# would route rxe's packets through lo, where no rxe device listens. So:
#   - rule "oif vX lookup T(N)" per device, table T(N) = 100 + N: the fabric subnet out of vX,
#     plus a local route for vX's own address (a device talking to itself);
#   - the rule for the local table moves from priority 0 to 1000, behind those rules;
#     inbound packets (no oif) still find the local table and get delivered;
#   - accept_local (the source of an inbound packet is a local address), rp_filter off;
#   - static neighbour entries with the fixed MACs: no ARP on the fabric at all;
#   - IPv6 off on new links, so each device has two GIDs: [0] the fe80 default one and
#     [1] ::ffff:198.18.0.N, RoCE v2. KVT_GID_INDEX=1.

KVT_FABRIC_MODULES="rdma_rxe ib_uverbs rdma_ucm veth bridge crc32_generic"
# crc32_generic: rxe's ICRC asks the crypto API for "crc32"; the guest CPU model hides
# PCLMULQDQ (its emulation is slow), so crc32-pclmul cannot serve it.

# kvt_fabric_up X... : builds the fabric; sets the array kvt_fabric_env to the variables
# the command gets (KVT_RDMA_DEVICES, KVT_IP_X, KVT_NETDEV_X). Returns non-zero on failure.
kvt_fabric_up() {
  local -a devs=("$@")
  local i j n x y batch="" rdma_batch="" tab
  local -A ip=() mac=()
  kvt_fabric_env=()
  [ ${#devs[@]} -gt 0 ] || { kvt_fabric_env=(KVT_RDMA_DEVICES=); return 0; }

  for i in "${!devs[@]}"; do
    n=$((i + 1))
    ip[${devs[i]}]=198.18.0.$n
    printf -v "mac[${devs[i]}]" '02:4b:56:54:00:%02x' "$n"
  done

  # Shell builtins only (no exec): these must be set before the links exist.
  local kv
  for kv in ipv6/conf/default/disable_ipv6=1 \
            ipv4/conf/all/rp_filter=0 ipv4/conf/default/rp_filter=0 \
            ipv4/conf/all/accept_local=1 ipv4/conf/default/accept_local=1 \
            ipv4/conf/all/arp_ignore=1 ipv4/conf/all/arp_announce=2; do
    echo "${kv#*=}" > "/proc/sys/net/${kv%%=*}" || return 1
  done

  # shellcheck disable=SC2086
  modprobe -a $KVT_FABRIC_MODULES || return 1

  batch+="link set lo up"$'\n'
  batch+="link add br-kvt type bridge"$'\n'
  batch+="link set br-kvt mtu 4200 up"$'\n'
  for i in "${!devs[@]}"; do
    x=${devs[i]} tab=$((101 + i))
    batch+="link add v$x address ${mac[$x]} mtu 4200 type veth peer name p$x mtu 4200"$'\n'
    batch+="link set p$x master br-kvt up"$'\n'
    batch+="link set v$x up"$'\n'
    batch+="addr add ${ip[$x]}/24 dev v$x noprefixroute"$'\n'
    batch+="route add 198.18.0.0/24 dev v$x src ${ip[$x]} table $tab"$'\n'
    batch+="route add local ${ip[$x]} dev v$x table $tab"$'\n'
    batch+="rule add pref $tab oif v$x lookup $tab"$'\n'
    for y in "${devs[@]}"; do
      [ "$y" = "$x" ] && continue
      batch+="neigh replace ${ip[$y]} lladdr ${mac[$y]} dev v$x nud permanent"$'\n'
    done
    rdma_batch+="link add rxe$x type rxe netdev v$x"$'\n'
  done
  batch+="rule add pref 1000 lookup local"$'\n'
  batch+="rule del pref 0 lookup local"$'\n'
  ip -batch - <<<"$batch" || return 1
  rdma -b - <<<"$rdma_batch" || return 1

  # The RoCE v2 GID appears asynchronously (ib_core's netdev event work).
  local gid tries sleeper names=""  # at most 200 x 50 ms per device
  exec {sleeper}<> <(:)
  for x in "${devs[@]}"; do
    for ((tries = 0; tries < 200; tries++)); do
      read -r gid < "/sys/class/infiniband/rxe$x/ports/1/gids/1" || gid=""
      [[ $gid == 0000:0000:0000:0000:0000:ffff:* ]] && break
      read -r -t 0.05 -u "$sleeper" _ || true
    done
    [[ $gid == 0000:0000:0000:0000:0000:ffff:* ]] || { echo "rxe$x: no RoCE v2 GID at index 1" >&2; return 1; }
    names+="${names:+ }rxe$x"
    kvt_fabric_env+=("KVT_IP_$x=${ip[$x]}" "KVT_NETDEV_$x=v$x")
  done
  exec {sleeper}<&-
  kvt_fabric_env+=("KVT_RDMA_DEVICES=$names")
}
