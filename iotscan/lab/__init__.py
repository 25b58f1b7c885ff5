"""The attack lab: labeled IoT traffic made by real tools in isolated network namespaces.

``netns`` builds and checks the namespaces, ``services`` starts the victim services in them,
``agents`` holds the small stdlib programs run inside them (device panel, NTP, C2, sensor
drivers), ``scenario`` says what a scenario is (its context, labels and catalogue), ``scenarios``
is the catalogue of benign and attack scenarios, ``tools`` maps the programs to their Debian
packages, and ``run`` records each scenario into its own pcap and writes the manifest.

It may import ``iotscan.capture`` and ``iotscan.errors``.
"""
