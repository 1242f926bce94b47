"""What Xen itself gives a backend domain, simulated: guest memory as files
(``memory``), the grant table (``gnttab``), event channels (``evtchn``) and the
``XenHost`` a daemon gets for ``--xen sim:DIR`` (``xenhost``)."""
