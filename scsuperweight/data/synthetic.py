"""Seeded synthetic AD-like single-nucleus counts with planted, known disease programs.

The demo, the examples and the tests need cortex-like data whose right answers are known: seven brain cell types
with real marker genes, donors with their own noise and depth, and disease programs from the AD literature
(disease-associated and interferon-responsive microglia, reactive astrocytes, synaptic loss in excitatory neurons)
switched on in AD donors only. The programs and markers are written into ``adata.uns["synthetic_truth"]``, so a
test can ask whether a method finds exactly them.

Every gene is a real HGNC symbol, written out here from knowledge: markers and programs first, then ribosomal,
mitochondrially encoded, housekeeping and brain-expressed genes as a realistic background. Counts are
gamma-Poisson (negative binomial) draws around a per-cell-type profile, so expression is sparse, over-dispersed
and integer, like UMI counts. This module imports nothing of ours beyond logging (data/ sits at the bottom of
the import graph).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scsuperweight._log import logger

TRUTH_KEY = "synthetic_truth"

CELL_TYPES = (
    "excitatory neuron",
    "inhibitory neuron",
    "astrocyte",
    "microglia",
    "oligodendrocyte",
    "OPC",
    "endothelial",
)
# Roughly the composition of cortex snRNA-seq (neurons dominate, then oligodendrocytes; endothelial cells are rare).
CELL_TYPE_FRACTIONS = (0.42, 0.14, 0.10, 0.07, 0.19, 0.05, 0.03)
# Neuronal nuclei carry more RNA than glial ones; relative to median_umis.
_CELL_TYPE_DEPTH = (1.5, 1.3, 0.8, 0.7, 0.8, 0.9, 0.7)
CONDITIONS = ("control", "AD")

# Type-specific markers (canonical snRNA-seq markers of human cortex). Kept in step with the MARKER_* sets of the
# bundled GMT (a test checks it).
MARKERS: dict[str, tuple[str, ...]] = {
    "excitatory neuron": (
        "SLC17A7", "SATB2", "RORB", "CUX2", "TBR1", "NEUROD6", "FEZF2", "BCL11B", "CBLN2", "THEMIS",
        "SLC17A6", "NEUROD2", "LDB2", "TSHZ2", "HS3ST4",
    ),
    "inhibitory neuron": (
        "GAD1", "GAD2", "SLC32A1", "PVALB", "SST", "VIP", "LAMP5", "ADARB2", "LHX6", "SOX6",
        "DLX1", "DLX5", "DLX6", "ERBB4", "NXPH1", "KIT", "GRIK1",
    ),
    "astrocyte": (
        "GFAP", "AQP4", "SLC1A2", "SLC1A3", "ALDH1L1", "GJA1", "ALDOC", "SOX9", "GLUL", "FGFR3",
        "SLC4A4", "ETNPPL", "GPC5", "ADGRV1", "AGT", "BMPR1B", "ATP1A2", "NDRG2",
    ),
    "microglia": (
        "P2RY12", "CX3CR1", "CSF1R", "C1QA", "C1QB", "C1QC", "AIF1", "PTPRC", "ITGAM", "CD74",
        "TMEM119", "SPI1", "HEXB", "DOCK8", "INPP5D", "APBB1IP", "LY86", "IKZF1",
    ),
    "oligodendrocyte": (
        "MBP", "MOBP", "PLP1", "MOG", "MAG", "ST18", "CNP", "OPALIN", "CLDN11", "ERMN",
        "TF", "ENPP2", "CNDP1", "PLEKHH1", "RNF220", "CTNNA3",
    ),
    "OPC": (
        "PDGFRA", "VCAN", "CSPG4", "PCDH15", "LHFPL3", "MEGF11", "TNR", "GPR17", "COL9A1", "SMOC1",
        "PTPRZ1", "XYLT1",
    ),
    "endothelial": (
        "CLDN5", "FLT1", "VWF", "PECAM1", "CDH5", "ABCB1", "ATP10A", "SLC2A1", "ESAM", "KDR",
        "ERG", "MFSD2A", "TEK", "EMCN", "CD34",
    ),
}
# Genes shared by a lineage rather than one type: raised in every listed type, not recorded as markers.
_SHARED: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("excitatory neuron", "inhibitory neuron"), (
        "RBFOX3", "STMN2", "NEFL", "NEFM", "MAP2", "RBFOX1", "CELF4", "NRXN1", "KCNIP4", "CSMD1",
        "SNAP25", "SYT1", "SYN1", "SYN2", "SYP", "STX1A", "VAMP2", "RAB3A", "GAP43", "UCHL1",
    )),
    (("oligodendrocyte", "OPC"), ("SOX10", "OLIG1", "OLIG2", "NKX2-2")),
)

# Disease programs, active in AD donors only, in one cell type each. log2_fc is the change of the expected count.
PROGRAMS: dict[str, dict] = {
    "dam_microglia": {
        # Keren-Shaul et al. 2017 (Cell) DAM stage 1 and 2 genes, human orthologues, plus SPP1/CD68/GPNMB/LGALS3.
        "cell_type": "microglia", "direction": "up", "log2_fc": 1.5,
        "genes": (
            "APOE", "TREM2", "TYROBP", "SPP1", "LPL", "CST7", "ITGAX", "CD9", "CTSD", "CTSB", "CTSL",
            "CD68", "AXL", "CLEC7A", "LGALS3", "GPNMB", "CSF1", "LILRB4", "TIMP2", "LYZ",
        ),
    },
    "homeostatic_microglia": {
        "cell_type": "microglia", "direction": "down", "log2_fc": 1.0,
        "genes": (
            "P2RY12", "P2RY13", "CX3CR1", "TMEM119", "SELPLG", "GPR34", "SALL1", "OLFML3", "TGFBR1", "CSF1R",
        ),
    },
    "interferon_microglia": {
        # interferon-responsive microglia (type I IFN-stimulated genes)
        "cell_type": "microglia", "direction": "up", "log2_fc": 2.0,
        "genes": (
            "ISG15", "IFIT1", "IFIT2", "IFIT3", "IFI6", "IFI44L", "MX1", "OAS1", "OAS2", "OAS3",
            "IRF7", "STAT1", "BST2", "RSAD2", "XAF1", "IFITM3",
        ),
    },
    "reactive_astrocyte": {
        # pan-reactive and A1 genes (Liddelow et al. 2017 Nature; Zamanian et al. 2012 J Neurosci), human symbols
        "cell_type": "astrocyte", "direction": "up", "log2_fc": 1.5,
        "genes": (
            "GFAP", "SERPINA3", "CHI3L1", "C3", "VIM", "CD44", "OSMR", "CP", "LCN2", "TIMP1",
            "HSPB1", "CRYAB", "MAOB", "STAT3", "SERPING1",
        ),
    },
    "synaptic_excitatory": {
        "cell_type": "excitatory neuron", "direction": "down", "log2_fc": 1.0,
        "genes": (
            "SNAP25", "SYT1", "SYN1", "SYN2", "SYP", "STX1A", "VAMP2", "RAB3A", "NRGN", "CAMK2A",
            "GRIN1", "GRIN2A", "GRIN2B", "DLG4", "SV2A", "NPTX2", "VGF", "BDNF", "CPLX1", "CPLX2",
        ),
    },
}

# Background genes, by group: (mean, sd) of the natural-log relative abundance drawn for each gene.
_RIBOSOMAL = (
    "RPL3", "RPL4", "RPL5", "RPL6", "RPL7", "RPL7A", "RPL8", "RPL9", "RPL10", "RPL10A", "RPL11", "RPL12",
    "RPL13", "RPL13A", "RPL14", "RPL15", "RPL17", "RPL18", "RPL18A", "RPL19", "RPL21", "RPL22", "RPL23",
    "RPL23A", "RPL24", "RPL26", "RPL27", "RPL27A", "RPL28", "RPL29", "RPL30", "RPL31", "RPL32", "RPL34",
    "RPL35", "RPL35A", "RPL36", "RPL36A", "RPL37", "RPL37A", "RPL38", "RPL39", "RPL41", "RPLP0", "RPLP1",
    "RPLP2", "RPS2", "RPS3", "RPS3A", "RPS4X", "RPS5", "RPS6", "RPS7", "RPS8", "RPS9", "RPS10", "RPS11",
    "RPS12", "RPS13", "RPS14", "RPS15", "RPS15A", "RPS16", "RPS17", "RPS18", "RPS19", "RPS20", "RPS21",
    "RPS23", "RPS24", "RPS25", "RPS26", "RPS27", "RPS27A", "RPS28", "RPS29", "RPSA",
)
_MITOCHONDRIAL = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3", "MT-ND3", "MT-ND4L", "MT-ND4",
    "MT-ND5", "MT-ND6", "MT-CYB",
)
_HOUSEKEEPING = (
    "ACTB", "ACTG1", "GAPDH", "B2M", "PPIA", "PPIB", "EEF1A1", "EEF1A2", "EEF2", "EEF1G", "TPT1", "UBB", "UBC",
    "HSP90AB1", "HSPA8", "CALM1", "CALM2", "CALM3", "YWHAB", "YWHAE", "YWHAG", "YWHAH", "YWHAQ", "YWHAZ",
    "PGK1", "HPRT1", "TBP", "GUSB", "PFN1", "PFN2", "CFL1", "MYL6", "FTL", "FTH1", "SOD1", "PRDX1", "TMSB4X",
    "TMSB10", "MALAT1", "NEAT1", "MEG3", "EIF1", "EIF4A1", "EIF4A2", "EIF4G2", "PABPC1", "HNRNPA1",
    "HNRNPA2B1", "HNRNPK", "HNRNPU", "NPM1", "NACA", "BTF3", "RACK1", "SRSF3", "SRSF5", "SRSF7", "SFPQ",
    "DDX5", "DDX17", "PTMA", "TUBA1A", "TUBA1B", "TUBB", "TUBB2A", "TUBB2B", "TUBB4A", "LMNA", "LMNB1",
    "SERF2", "UQCRH", "ATP6V0C", "ATP6V1A", "ATP6V1B2", "ARF1", "ARF3", "RAB1A", "RAB5A", "RAB7A", "RAB11A",
    "CLTC", "CLTA", "KIF5A", "KIF5C", "KIF1A", "DYNC1H1", "DYNLL1", "MAPRE1", "CKB", "CST3", "SPARCL1",
    "CLU", "ITM2B", "ITM2C", "GPM6A", "GPM6B", "CD81", "CD63", "CD47", "PSAP", "NPC2", "ATP5F1A", "ATP5F1B",
    "COX4I1", "NDUFA4", "CYCS",
)
_BRAIN_AND_OTHER = (
    # neurotransmission and receptors
    "GRIA1", "GRIA2", "GRIA3", "GRIA4", "GRIK2", "GRIK3", "GRIN2D", "GRIN3A", "GRM1", "GRM3", "GRM5", "GRM7",
    "GABRA1", "GABRA2", "GABRA3", "GABRA4", "GABRA5", "GABRB1", "GABRB2", "GABRB3", "GABRG2", "GABRD",
    "GABBR1", "GABBR2", "SLC6A1", "SLC6A11", "SLC1A1", "CHRM1", "CHRM3", "CHRNA4", "CHRNA7", "CHRNB2",
    "HTR1A", "HTR2A", "HTR2C", "DRD1", "DRD2", "ADRA1A", "ADRA2A", "ADRB1", "OPRK1", "OPRM1", "CNR1", "NPY",
    "NPY1R", "SSTR2", "CRH", "CRHR1", "TAC1", "TAC3", "PENK", "PDYN", "CORT", "CCK", "CALB1", "CALB2", "RELN",
    "NOS1", "ADCYAP1", "NTS",
    # synapse
    "STX1B", "STXBP1", "SYN3", "SYT2", "SYT4", "SYT7", "SYT13", "RIMS1", "RIMS2", "UNC13A", "UNC13C", "BSN",
    "PCLO", "ERC2", "CADPS", "NSF", "SNAP91", "AP2M1", "DNM1", "SH3GL2", "AMPH", "SYNJ1", "NLGN1", "NLGN2",
    "NLGN3", "NRXN2", "NRXN3", "SHANK1", "SHANK2", "SHANK3", "HOMER1", "DLG2", "DLG3", "GPHN", "ARHGEF9",
    "NPTX1", "NPTXR", "CBLN1", "CBLN4", "LRRTM1", "LRRTM2", "SYNPO", "SYNGR1", "SYNGR3", "SV2B", "SV2C",
    "CAMK2B", "CAMK4", "PRKCG", "PPP3CA",
    # ion channels and pumps
    "KCNA1", "KCNA2", "KCNB1", "KCNC1", "KCNC2", "KCND2", "KCND3", "KCNQ2", "KCNQ3", "KCNQ5", "KCNMA1",
    "KCNH7", "KCNJ3", "KCNJ6", "KCNJ10", "KCNJ16", "KCNK2", "SCN1A", "SCN2A", "SCN3A", "SCN8A", "SCN1B",
    "SCN2B", "SCN4B", "CACNA1A", "CACNA1B", "CACNA1C", "CACNA1D", "CACNA1E", "CACNA2D1", "CACNA2D3",
    "CACNB2", "CACNB4", "CACNG2", "HCN1", "HCN2", "ATP1A1", "ATP1A3", "ATP1B1", "ATP1B2", "ATP2B1", "ATP2B2",
    # axon, cytoskeleton, guidance
    "NEFH", "INA", "MAP1B", "MAPT", "NCAM1", "NCAM2", "L1CAM", "CNTN1", "CNTN2", "CNTNAP2", "NRCAM", "NFASC",
    "ANK2", "ANK3", "SPTAN1", "SPTBN1", "SPTBN4", "DPYSL2", "DPYSL3", "CRMP1", "BASP1", "MARCKS", "ENO2",
    "THY1", "NRN1", "CHN1", "VSNL1", "HPCA", "HPCAL1", "HPCAL4", "NELL2", "OLFM1", "SEMA3A", "SEMA3E",
    "PLXNA4", "ROBO1", "ROBO2", "SLIT2", "EPHA4", "EPHA5", "EPHA6", "EPHB1", "EFNA5", "NTRK2", "NTRK3", "NTF3",
    # glia, lipids, myelin
    "SPARC", "PTGDS", "SLC7A11", "S100B", "SOX2", "NFIA", "NFIB", "ID3", "ID4", "HES1", "HES5", "NOTCH1",
    "NOTCH2", "JAG1", "LRP1", "LDLR", "VLDLR", "ABCA1", "ABCG1", "SREBF2", "HMGCR", "HMGCS1", "FDFT1", "SQLE",
    "DHCR24", "DHCR7", "LSS", "CYP51A1", "MVD", "IDI1", "FASN", "SCD", "ACACA", "MAL", "MYRF", "PLLP", "FA2H",
    "UGT8", "ASPA", "GJC2", "GJB1", "NKX6-2", "ENPP6", "BCAS1", "SLC44A1", "ANLN", "NINJ2", "TPPP", "TPPP3",
    "KLK6", "APOD", "QDPR", "PMP22", "SOX8", "ZNF488", "QKI",
    # immune and complement
    "CD14", "FCGR1A", "FCGR2A", "FCGR3A", "FCER1G", "TLR2", "TLR4", "TLR7", "MYD88", "IRAK4", "TRAF6",
    "NFKB1", "NFKBIA", "RELA", "IL1B", "IL6", "TNF", "IL10", "IL18", "TGFB1", "CCL2", "CCL3", "CCL4", "CXCL8",
    "CXCL10", "CCR5", "IL34", "MRC1", "CD163", "LYVE1", "HLA-A", "HLA-B", "HLA-C", "HLA-E", "HLA-DRA",
    "HLA-DRB1", "HLA-DPA1", "HLA-DPB1", "HLA-DQA1", "HLA-DQB1", "CIITA", "CD86", "CD4", "CD8A", "CD3E",
    "MS4A6A", "MS4A4A", "MS4A7", "CD33", "LILRB2", "ITGB2", "CYBB", "NCF1", "SYK", "PLCG2", "PIK3CD", "VAV1",
    "RAC2", "LCP1", "LCP2", "CORO1A", "ARHGDIB", "LAPTM5", "C3AR1", "C5AR1", "MPEG1", "CD37", "CD53", "CTSS",
    "CTSC", "CTSZ", "CTSH", "CTSA", "GRN", "LGMN", "ASAH1", "GLB1", "HEXA", "C1R", "C1S", "C2", "C4A", "C4B",
    "C5", "CR1", "CD55", "CD59", "CFH", "CFI", "IFI27", "IFI44", "IFITM1", "MX2", "OASL", "IRF9", "STAT2",
    "HERC5", "USP18", "ISG20", "EPSTI1", "CMPK2", "GBP2", "FBLN5", "FKBP5", "PSMB8", "SRGN", "AMIGO2",
    "STEAP4", "S1PR3", "ASPG", "UGT1A1",
    # vascular, pericytes, extracellular matrix
    "PDGFRB", "RGS5", "KCNJ8", "ABCC9", "ACTA2", "MYH11", "TAGLN", "DCN", "COL1A1", "COL1A2", "COL3A1",
    "COL4A1", "COL4A2", "LAMA2", "LAMB1", "LAMC1", "NID1", "VTN", "FN1", "IGFBP7", "SLC7A5", "TFRC", "LEF1",
    "FOXC1", "SOX17", "SOX18", "VEGFA",
    # immediate-early and stress responses
    "FOS", "FOSB", "JUN", "JUNB", "JUND", "EGR1", "EGR2", "EGR3", "ARC", "NR4A1", "NR4A2", "NR4A3", "ATF3",
    "IER2", "DUSP1", "DUSP6", "KLF2", "KLF4", "KLF6", "ZFP36", "HSPA1A", "HSPA1B", "HSPH1", "DNAJB1",
    "HSP90AA1", "HSPD1", "HSPE1", "BAG3", "DDIT3", "XBP1", "ATF4", "ATF6", "ERN1", "EIF2AK3", "HSPA5", "CALR",
    "CANX", "PDIA3", "PDIA6", "P4HB",
    # proteostasis, autophagy, oxidative stress, neurodegeneration
    "SQSTM1", "MAP1LC3B", "BECN1", "ATG5", "ATG7", "ATG12", "ULK1", "TFEB", "LAMP1", "LAMP2", "PSMA1",
    "PSMA2", "PSMA3", "PSMB1", "PSMB2", "PSMB5", "PSMB9", "PSMC1", "PSMC2", "PSMD1", "PSMD2", "UBA1",
    "UBE2D3", "UBE2N", "USP14", "PARK7", "PRKN", "PINK1", "LRRK2", "SNCA", "VCP", "OPTN", "TBK1", "FUS",
    "TARDBP", "C9orf72", "SOD2", "CAT", "GPX1", "GPX4", "PRDX2", "PRDX6", "TXN", "TXNRD1", "GSR", "NQO1",
    "HMOX1", "MT1X", "MT2A", "MT3", "TXNIP",
    # amyloid, tau and AD risk loci
    "APP", "PSEN1", "PSEN2", "BACE1", "BACE2", "ADAM10", "ADAM17", "ADAM9", "NCSTN", "APH1A", "APH1B",
    "PSENEN", "SORL1", "APBB1", "APBA1", "IDE", "MME", "ECE1", "GSK3B", "CDK5", "CDK5R1", "MARK1", "MARK2",
    "MARK4", "DYRK1A", "CSNK1D", "CSNK1E", "PPP2CA", "PPP2R2A", "PIN1", "STUB1", "TTBK1", "BIN1", "PICALM",
    "ABCA7", "ABI3", "EPHA1", "PTK2B", "CASS4", "FERMT2", "SLC24A4", "CELF1", "ZCWPW1", "CD2AP", "SORT1",
    "PRKD3", "IDUA", "RHOH", "ANKH", "COX7C", "TNIP1", "RASGEF1C", "HS3ST5", "UNC5CL", "EPDR1", "SEC61G",
    "SHARPIN", "TSPAN14", "BLNK", "PLEKHA1", "TPCN1", "SNX1", "DOC2A", "MAF", "BCKDK", "KAT8", "PRDM7",
    "WDR81", "MYO15A", "WNT3", "TSPOAP1", "SIGLEC11", "RBCK1", "SLC2A4RG", "ICA1", "TMEM106B", "JAZF1",
    "SPDYE3", "EPHX2", "CLNK", "USP6NL", "MINDY2", "NCK2", "UMAD1", "HS3ST1", "SPPL2A", "CCDC6", "ECHDC3",
    "SCIMP", "ACE", "WWOX", "RIN3", "MEF2C",
    # metabolism and mitochondria
    "HK1", "HK2", "GPI", "PFKM", "PFKP", "PFKL", "ALDOA", "TPI1", "PGAM1", "ENO1", "PKM", "LDHA", "LDHB",
    "SLC2A3", "SLC16A1", "SLC16A3", "SLC16A7", "PDHA1", "PDHB", "DLAT", "DLD", "CS", "ACO2", "IDH3A", "IDH3B",
    "OGDH", "SUCLA2", "SUCLG1", "SDHA", "SDHB", "SDHC", "SDHD", "FH", "MDH1", "MDH2", "GOT1", "GOT2", "GLS",
    "GLUD1", "PC", "ACLY", "ACSS2", "CPT1A", "CPT1C", "HADHA", "HADHB", "ACADM", "ACADVL", "NDUFA1",
    "NDUFA2", "NDUFB8", "NDUFS1", "NDUFS2", "NDUFV1", "UQCRC1", "UQCRC2", "UQCRFS1", "CYC1", "COX5A", "COX5B",
    "COX6C", "COX7A2", "PGD", "G6PD", "TKT", "TALDO1",
    # signalling
    "MAPK1", "MAPK3", "MAPK8", "MAPK9", "MAPK10", "MAPK14", "MAP2K1", "MAP2K4", "MAP3K5", "AKT1", "AKT2",
    "AKT3", "PIK3CA", "PIK3CB", "PIK3R1", "PTEN", "MTOR", "RPTOR", "RICTOR", "TSC1", "TSC2", "RHEB",
    "RPS6KB1", "EIF4EBP1", "KRAS", "HRAS", "NRAS", "RAF1", "BRAF", "SRC", "FYN", "LYN", "PRKACA", "PRKACB",
    "PRKAR1A", "PRKAR1B", "PRKCA", "PRKCB", "PRKCE", "PLCB1", "ADCY1", "ADCY5", "ADCY8", "GNAS", "GNAQ",
    "GNAI1", "GNAO1", "GNB1", "RHOA", "RAC1", "CDC42", "ROCK1", "ROCK2", "PAK1", "LIMK1", "CTNNB1", "GSK3A",
    "APC", "AXIN1", "AXIN2", "WNT7A", "WNT7B", "LRP5", "LRP6", "DKK1", "TGFB2", "TGFBR2", "SMAD2", "SMAD3",
    "SMAD4", "BMPR2", "ID2", "JAK1", "JAK2", "SOCS3",
    # transcription and chromatin
    "CREB1", "CREBBP", "EP300", "MEF2A", "MEF2D", "TCF4", "TCF7L2", "SP1", "YY1", "CTCF", "RAD21", "SMC1A",
    "SMC3", "HDAC1", "HDAC2", "HDAC3", "HDAC4", "HDAC5", "SIRT1", "SIRT3", "DNMT1", "DNMT3A", "TET1", "TET2",
    "MECP2", "KMT2A", "KMT2D", "KDM5C", "SUZ12", "EED", "MYT1L", "POU3F2", "POU3F3", "SOX4", "SOX11", "SOX5",
    "ZBTB20", "NFIX", "BHLHE40", "FOXO1", "FOXO3", "FOXP1", "FOXP2", "NR3C1",
)


def _gene_table() -> pd.DataFrame:
    """Every gene once, in a fixed order, with the group that sets its baseline abundance."""
    rows: dict[str, str] = {}
    for genes in MARKERS.values():
        rows.update(dict.fromkeys(genes, "marker"))
    for _, genes in _SHARED:
        for g in genes:
            rows.setdefault(g, "lineage")
    for prog in PROGRAMS.values():
        for g in prog["genes"]:
            rows.setdefault(g, "program")
    for group, genes in (
        ("ribosomal", _RIBOSOMAL),
        ("mitochondrial", _MITOCHONDRIAL),
        ("housekeeping", _HOUSEKEEPING),
        ("other", _BRAIN_AND_OTHER),
    ):
        for g in genes:
            rows.setdefault(g, group)
    return pd.DataFrame({"category": pd.Categorical(list(rows.values()))}, index=pd.Index(list(rows), name=None))


# Natural-log relative abundance (before normalising to proportions) of a gene outside the cell types that express
# it: (mean, sd) per group. The spread is what makes the counts as sparse as droplet data: a few hundred genes
# take most UMIs, most genes are seen in a minority of nuclei.
_BASELINE = {
    "ribosomal": (-1.0, 0.8),
    "mitochondrial": (-0.5, 0.7),
    "housekeeping": (-3.5, 1.5),
    "marker": (-5.5, 1.0),
    "lineage": (-5.5, 1.0),
    "program": (-4.5, 1.0),
    "other": (-6.5, 1.5),
}
# Level (uniform low, high) a gene is lifted to in the cell types that express it.
_LEVEL = {
    "marker": (2.5, 4.0),
    "lineage": (1.5, 3.0),
    "program_up": (0.0, 1.0),
    "program_down": (1.5, 2.5),
}
# Negative-binomial dispersion phi per gene: log-normal with this median and sd (natural log).
_DISPERSION = (0.4, 0.4)


def _allocate(n: int, fractions: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of n * fractions, with at least one of each when n allows."""
    raw = n * fractions
    counts = np.floor(raw).astype(int)
    if n >= len(fractions):
        counts = np.maximum(counts, 1)
    while counts.sum() > n:
        counts[np.argmax(counts)] -= 1
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    i = 0
    while counts.sum() < n:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts


def synthetic_ad(
    n_cells: int = 3000,
    n_donors: int = 8,
    seed: int = 0,
    *,
    median_umis: float = 3000.0,
    effect_scale: float = 1.0,
    donor_sd: float = 0.15,
) -> AnnData:
    """Seeded AD-like snRNA-seq counts of human cortex with planted disease programs.

    Parameters
    ----------
    n_cells
        Number of nuclei.
    n_donors
        Number of donors; they alternate AD, control, AD, ... so both conditions are present from two donors on.
    seed
        Seed of everything random here; the same seed gives the identical object.
    median_umis
        Target median library size. Neuronal nuclei get more, glial fewer (snRNA-seq-like).
    effect_scale
        Multiplies every program's log2 fold change; 0 gives data with no disease signal (a null control).
    donor_sd
        Standard deviation of each donor's gene-wise log-normal multiplicative noise (natural log).

    Returns
    -------
    AnnData with raw integer counts in ``X`` (CSR, int32); ``obs``: ``cell_type``, ``condition`` (``"AD"`` or
    ``"control"``, set per donor) and ``donor`` (all categorical); ``var``: ``category`` (marker, lineage,
    program, ribosomal, mitochondrial, housekeeping, other); ``uns["synthetic_truth"]``: ``programs``
    (name -> ``cell_type``, ``condition``, ``direction``, ``genes``, ``log2_fc``), ``markers``
    (cell type -> genes) and ``params``.

    Examples
    --------
    >>> from scsuperweight.datasets import synthetic_ad
    >>> adata = synthetic_ad(n_cells=500, seed=1)
    >>> sorted(adata.uns["synthetic_truth"]["programs"])[:2]
    ['dam_microglia', 'homeostatic_microglia']
    """
    if int(n_cells) < len(CELL_TYPES):
        msg = f"n_cells={n_cells!r} is fewer than the {len(CELL_TYPES)} cell types; pass n_cells >= {len(CELL_TYPES)}."
        raise ValueError(msg)
    if int(n_donors) < 2:
        msg = f"n_donors={n_donors!r}: at least 2 donors are needed so that both AD and control exist."
        raise ValueError(msg)
    if not median_umis > 0:
        msg = f"median_umis={median_umis!r} must be positive (a typical snRNA-seq median is 2,000-5,000)."
        raise ValueError(msg)
    if effect_scale < 0 or donor_sd < 0:
        msg = f"effect_scale={effect_scale!r} and donor_sd={donor_sd!r} must be >= 0."
        raise ValueError(msg)
    n_cells, n_donors = int(n_cells), int(n_donors)
    rng = np.random.default_rng(seed)

    var = _gene_table()
    genes = var.index
    col = {g: j for j, g in enumerate(genes)}
    n_genes, n_types = len(genes), len(CELL_TYPES)
    type_idx = {t: i for i, t in enumerate(CELL_TYPES)}

    # per-cell-type log profile: each gene's baseline with a little type-specific jitter, lifted to a set level in
    # the cell types that express it (markers, lineage genes, the program genes where the program acts)
    base = np.empty(n_genes)
    for group, (mean, sd) in _BASELINE.items():
        mask = (var["category"] == group).to_numpy()
        base[mask] = rng.normal(mean, sd, mask.sum())
    level = np.full((n_types, n_genes), -np.inf)

    def _express(types, names, low, high):
        cols = [col[g] for g in names]
        for t in types:
            level[type_idx[t], cols] = np.maximum(level[type_idx[t], cols], rng.uniform(low, high, len(cols)))

    for t, names in MARKERS.items():
        _express((t,), names, *_LEVEL["marker"])
    for types, names in _SHARED:
        _express(types, names, *_LEVEL["lineage"])
    for prog in PROGRAMS.values():
        # a program has to be expressed where it acts for its change to be measurable; genes that go down need
        # room to fall
        _express((prog["cell_type"],), prog["genes"], *_LEVEL[f"program_{prog['direction']}"])
    logprof = np.maximum(base[None, :] + rng.normal(0.0, 0.3, (n_types, n_genes)), level)  # (T, G)

    # log fold change of each program, applied to AD donors' cells after normalisation, so that log2_fc is the
    # exact change of the expected count
    effect = np.zeros((n_types, n_genes))
    for prog in PROGRAMS.values():
        sign = 1.0 if prog["direction"] == "up" else -1.0
        effect[type_idx[prog["cell_type"]], [col[g] for g in prog["genes"]]] += (
            sign * prog["log2_fc"] * effect_scale * np.log(2.0)
        )

    donor_names = np.array([f"D{i + 1:02d}" for i in range(n_donors)])
    donor_is_ad = np.arange(n_donors) % 2 == 0
    donor_noise = rng.normal(0.0, donor_sd, (n_donors, n_genes))  # (D, G)
    donor_depth = np.exp(rng.normal(0.0, 0.2, n_donors))

    cell_type = rng.permutation(np.repeat(np.arange(n_types), _allocate(n_cells, np.array(CELL_TYPE_FRACTIONS))))
    donor = rng.permutation(np.arange(n_cells) % n_donors)

    # expected proportions per (cell type, donor) group, then per cell
    logits = logprof[:, None, :] + donor_noise[None, :, :]  # (T, D, G)
    logits -= logits.max(axis=2, keepdims=True)
    prop = np.exp(logits)
    prop /= prop.sum(axis=2, keepdims=True)
    prop *= np.exp(effect[:, None, :] * donor_is_ad[None, :, None])
    size = np.exp(rng.normal(0.0, 0.45, n_cells)) * donor_depth[donor] * np.asarray(_CELL_TYPE_DEPTH)[cell_type]
    size *= median_umis / np.median(size)
    mu = prop[cell_type, donor] * size[:, None]  # (N, G)

    # gamma-Poisson: gene-wise dispersion phi, so variance = mu + phi * mu^2
    phi = np.exp(rng.normal(np.log(_DISPERSION[0]), _DISPERSION[1], n_genes))
    shape = 1.0 / phi
    counts = rng.poisson(mu * rng.gamma(shape, phi, size=mu.shape))
    X = sp.csr_matrix(counts.astype(np.int32))

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, categories=list(CELL_TYPES)),
            "condition": pd.Categorical(
                np.where(donor_is_ad[donor], "AD", "control"), categories=list(CONDITIONS)
            ),
            "donor": pd.Categorical.from_codes(donor, categories=list(donor_names)),
        },
        index=pd.Index([f"cell{i:05d}" for i in range(n_cells)]),
    )
    truth = {
        "programs": {
            name: {
                "cell_type": prog["cell_type"],
                "condition": "AD",
                "direction": prog["direction"],
                "genes": list(prog["genes"]),
                "log2_fc": float(prog["log2_fc"] * effect_scale),
            }
            for name, prog in PROGRAMS.items()
        },
        "markers": {t: list(names) for t, names in MARKERS.items()},
        "params": {
            "n_cells": n_cells,
            "n_donors": n_donors,
            "seed": int(seed),
            "median_umis": float(median_umis),
            "effect_scale": float(effect_scale),
            "donor_sd": float(donor_sd),
        },
    }
    adata = AnnData(X=X, obs=obs, var=var, uns={TRUTH_KEY: truth})
    zeros = 1.0 - X.nnz / (n_cells * n_genes)
    logger.debug("synthetic_ad: %d cells x %d genes, %.1f%% zeros, seed=%s", n_cells, n_genes, 100 * zeros, seed)
    return adata
