"""ca-watchdog: hands-off high availability for Dogtag PKI CA masters and clones."""

__version__ = "0.1.0"
