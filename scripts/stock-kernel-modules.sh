# The stock kernel's modules svclab needs and a minimal kernel may lack (sourced by
# vm-init.sh and vagrant-provision.sh): IPVS and its schedulers (--proxy-mode ipvs, every
# --ipvs-scheduler), netem and tbf (delay, bandwidth), ifb (shaping a link's ingress), and the
# Open vSwitch kernel datapath.
# shellcheck shell=bash
STOCK_KERNEL_MODULES=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh ip_vs_dh ip_vs_sed ip_vs_nq
                      sch_netem sch_tbf ifb openvswitch)
