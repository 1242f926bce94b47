"""The toolstack: domains and disks written into XenStore as libxl writes them
(``libxl``)."""
