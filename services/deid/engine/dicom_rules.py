"""Attribute rules for DICOM VL Whole Slide Microscopy instances.

A keep-list design: an attribute survives only when a rule below says so. The actions follow
the PS3.15 Basic Application Level Confidentiality Profile (Table E.1-1): UIDs are replaced
consistently (U), Type 2 attributes that must stay present are emptied (Z), Type 1 attributes
that must keep a value get a dummy or a keyed pseudonym (D), everything listed for removal
(X) is removed, and so is every attribute no rule knows (reported as unknown). Private
attributes are always removed. Dates and times are removed or blanked/dummied per the date
policy ("remove").
"""

from __future__ import annotations

import enum

from pydicom.datadict import tag_for_keyword


class Act(enum.Enum):
    KEEP = "keep"  # value unchanged
    SEQ = "seq"  # keep the sequence, clean every item recursively
    SEQ_EMPTY = "seq_empty"  # Type 2 sequence: keep it, without items (Z)
    UID = "uid"  # replace with a keyed, consistent UID (U)
    EMPTY = "empty"  # Type 2: keep, zero length (Z)
    DUMMY = "dummy"  # Type 1: non-empty dummy (D)
    REMOVE = "remove"  # X
    PSEUDO_PATIENT = "pseudo_patient"
    PATIENT_NAME = "patient_name"
    PSEUDO_CONTAINER = "pseudo_container"
    PSEUDO_SPECIMEN = "pseudo_specimen"
    PSEUDO_DEVICE = "pseudo_device"
    CONTENT = "content"  # a content-item sequence (specimen preparation steps etc.)
    SPECIMEN_PREPARATION = "specimen_preparation"  # per policy: SEQ_EMPTY or SEQ
    REPLACED = "replaced"  # removed from the input, set by the de-identifier itself


_KEEP = """
SpecificCharacterSet SOPClassUID InstanceNumber ContentQualification ImageType FrameType
Modality SeriesNumber AcquisitionNumber PatientOrientation PositionReferenceIndicator
Manufacturer ManufacturerModelName SoftwareVersions
SamplesPerPixel PhotometricInterpretation Rows Columns BitsAllocated BitsStored HighBit
PixelRepresentation PlanarConfiguration PixelAspectRatio SmallestImagePixelValue
LargestImagePixelValue PixelPaddingValue ICCProfile ColorSpace
RedPaletteColorLookupTableDescriptor GreenPaletteColorLookupTableDescriptor
BluePaletteColorLookupTableDescriptor RedPaletteColorLookupTableData
GreenPaletteColorLookupTableData BluePaletteColorLookupTableData
SegmentedRedPaletteColorLookupTableData SegmentedGreenPaletteColorLookupTableData
SegmentedBluePaletteColorLookupTableData
NumberOfFrames FrameIncrementPointer RepresentativeFrameNumber InConcatenationNumber
InConcatenationTotalNumber ConcatenationFrameOffsetNumber
PixelSpacing SliceThickness SpacingBetweenSlices XOffsetInSlideCoordinateSystem
YOffsetInSlideCoordinateSystem ZOffsetInSlideCoordinateSystem
ColumnPositionInTotalImagePixelMatrix RowPositionInTotalImagePixelMatrix
OpticalPathIdentifier DimensionIndexValues FrameAcquisitionNumber StackID
InStackPositionNumber FrameAcquisitionDuration RescaleIntercept RescaleSlope RescaleType
WindowCenter WindowWidth VOILUTFunction ReferencedSOPClassUID ReferencedFrameNumber
DimensionIndexPointer FunctionalGroupPointer DimensionDescriptionLabel
DimensionOrganizationType
AcquisitionDuration VolumetricProperties ImagedVolumeWidth ImagedVolumeHeight
ImagedVolumeDepth TotalPixelMatrixColumns TotalPixelMatrixRows ImageOrientationSlide
SpecimenLabelInImage FocusMethod ExtendedDepthOfField NumberOfFocalPlanes
DistanceBetweenFocalPlanes RecommendedAbsentPixelCIELabValue BurnedInAnnotation
RecognizableVisualFeatures LossyImageCompression LossyImageCompressionRatio
LossyImageCompressionMethod PresentationLUTShape TotalPixelMatrixFocalPlanes
NumberOfOpticalPaths
OpticalPathDescription IlluminationWaveLength LightPathFilterPassThroughWavelength
LightPathFilterPassBand ImagePathFilterPassThroughWavelength ImagePathFilterPassBand
ObjectiveLensPower ObjectiveLensNumericalAperture CondenserLensPower
CodeValue CodingSchemeDesignator CodingSchemeVersion CodeMeaning LongCodeValue URNCodeValue
ContextIdentifier ContextUID MappingResource MappingResourceUID MappingResourceName
ContextGroupExtensionFlag CodingSchemeUID CodingSchemeRegistry CodingSchemeExternalID
CodingSchemeName CodingSchemeResponsibleOrganization
ValueType RelationshipType NumericValue FloatingPointValue
ExtendedOffsetTable ExtendedOffsetTableLengths
"""

_SEQ = """
SharedFunctionalGroupsSequence PerFrameFunctionalGroupsSequence PixelMeasuresSequence
PlanePositionSlideSequence OpticalPathIdentificationSequence
WholeSlideMicroscopyImageFrameTypeSequence FrameContentSequence
PixelValueTransformationSequence FrameVOILUTSequence ReferencedImageSequence
PurposeOfReferenceCodeSequence DerivationImageSequence SourceImageSequence
DerivationCodeSequence DimensionOrganizationSequence DimensionIndexSequence
ContainerTypeCodeSequence SpecimenDescriptionSequence SpecimenTypeCodeSequence
PrimaryAnatomicStructureSequence PrimaryAnatomicStructureModifierSequence
TotalPixelMatrixOriginSequence OpticalPathSequence IlluminationTypeCodeSequence
IlluminationColorCodeSequence IlluminatorTypeCodeSequence
LightPathFilterTypeStackCodeSequence ImagePathFilterTypeStackCodeSequence
LensesCodeSequence ChannelDescriptionCodeSequence PaletteColorLookupTableSequence
CodingSchemeIdentificationSequence ConceptNameCodeSequence ConceptCodeSequence
MeasuredValueSequence MeasurementUnitsCodeSequence NumericValueQualifierCodeSequence
EquivalentCodeSequence ReferencedSeriesSequence ReferencedInstanceSequence
StudiesContainingOtherReferencedInstancesSequence SpecimenReferenceSequence
ReferencedSOPSequence
"""

_UID = """
SOPInstanceUID StudyInstanceUID SeriesInstanceUID FrameOfReferenceUID
DimensionOrganizationUID SpecimenUID PyramidUID AcquisitionUID ConcatenationUID
SOPInstanceUIDOfConcatenationSource ReferencedSOPInstanceUID DeviceUID
PaletteColorLookupTableUID UID
"""

# Type 2 attributes of the WSM IOD that must remain present (Z)
_EMPTY = """
StudyDate StudyTime ReferringPhysicianName StudyID AccessionNumber PatientBirthDate
PatientSex
"""

# Type 1 dates/times of the WSM IOD (D): replaced by a fixed dummy
_DUMMY = """
ContentDate ContentTime AcquisitionDateTime FrameAcquisitionDateTime FrameReferenceDateTime
"""

_SEQ_EMPTY = """
IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence
AcquisitionContextSequence
"""

_CONTENT = """
SpecimenPreparationStepContentItemSequence SpecimenLocalizationContentItemSequence
"""

# Listed by PS3.15 for removal (X, or X/Z/D where the WSM IOD does not need them); their
# values are remembered as identifying for verification.
_REMOVE = """
AcquisitionComments AcquisitionDate AcquisitionTime AdmittingDiagnosesCodeSequence
AdmittingDiagnosesDescription AdditionalPatientHistory AdmissionID Allergies BarcodeValue
LabelText BranchOfService ContentCreatorName ContributingEquipmentSequence
ContributionDateTime ContributionDescription CountryOfResidence CurrentPatientLocation
DerivationDescription DeviceDescription EthnicGroup FrameComments IconImageSequence
IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
InstanceCreationDate InstanceCreationTime InstanceCreatorUID InstitutionAddress
InstitutionName InstitutionalDepartmentName InstitutionCodeSequence
InstitutionalDepartmentTypeCodeSequence IssuerOfAccessionNumberSequence IssuerOfPatientID
IssuerOfPatientIDQualifiersSequence MedicalAlerts MedicalRecordLocator MilitaryRank
ModifiedAttributesSequence NameOfPhysiciansReadingStudy Occupation
OperatorIdentificationSequence OperatorsName OriginalAttributesSequence OtherPatientIDs
OtherPatientIDsSequence OtherPatientNames PatientAddress PatientAge PatientBirthName
PatientBirthTime PatientComments PatientInsurancePlanCodeSequence PatientMotherBirthName
PatientReligiousPreference PatientSize PatientTelephoneNumbers PatientWeight
PatientSexNeutered PerformedProcedureStepDescription PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartTime
PerformedProcedureStepEndDate PerformedProcedureStepEndTime PerformedLocation
PerformedStationAETitle PerformedStationName PerformingPhysicianName
PerformingPhysicianIdentificationSequence PersonAddress PersonTelephoneNumbers
PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence PregnancyStatus ProtocolName
PyramidDescription PyramidLabel ReasonForStudy ReferencedPatientSequence
ReferencedStudySequence ReferencedPerformedProcedureStepSequence ReferringPhysicianAddress
ReferringPhysicianTelephoneNumbers ReferringPhysicianIdentificationSequence
RequestAttributesSequence RequestedProcedureDescription RequestedProcedureID
RequestingPhysician RequestingService ResponsibleOrganization ResponsiblePerson SeriesDate
SeriesTime SeriesDescription SlideIdentifier SmokingStatus SpecimenAccessionNumber
SpecimenDetailedDescription SpecimenShortDescription StationName StudyComments
StudyDescription TimezoneOffsetFromUTC ContainerDescription ContainerComponentSequence
AlternateContainerIdentifierSequence ConsultingPhysicianName
AcquisitionDeviceProcessingDescription AcquisitionContextDescription StudyIDIssuer
ClinicalTrialSponsorName ClinicalTrialProtocolID ClinicalTrialProtocolName
ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialSubjectID
ClinicalTrialSubjectReadingID ClinicalTrialTimePointID ClinicalTrialTimePointDescription
ClinicalTrialCoordinatingCenterName ReasonForTheRequestedProcedure OrderEnteredBy
OrderEntererLocation FillerOrderNumberImagingServiceRequest
PlacerOrderNumberImagingServiceRequest PatientState SpecialNeeds RetrieveAETitle
StationAETitle DigitalSignaturesSequence DataSetTrailingPadding WindowCenterWidthExplanation
TextValue DateTime Date Time PersonName PixelDataProviderURL
ContextGroupVersion ContextGroupLocalVersion
"""

_REPLACED = """
PatientIdentityRemoved DeidentificationMethod DeidentificationMethodCodeSequence
LongitudinalTemporalInformationModified
"""


def _tags(names: str) -> list[int]:
    out = []
    for kw in names.split():
        tag = tag_for_keyword(kw)
        if tag is None:
            raise RuntimeError(f"unknown DICOM keyword in rules: {kw}")
        out.append(int(tag))
    return out


RULES: dict[int, Act] = {}
for _names, _act in (
    (_KEEP, Act.KEEP),
    (_SEQ, Act.SEQ),
    (_UID, Act.UID),
    (_EMPTY, Act.EMPTY),
    (_DUMMY, Act.DUMMY),
    (_SEQ_EMPTY, Act.SEQ_EMPTY),
    (_CONTENT, Act.CONTENT),
    (_REMOVE, Act.REMOVE),
    (_REPLACED, Act.REPLACED),
):
    for _t in _tags(_names):
        if _t in RULES:
            raise RuntimeError(f"duplicate DICOM rule for {_t:08X}")
        RULES[_t] = _act
RULES[int(tag_for_keyword("PatientID") or 0)] = Act.PSEUDO_PATIENT
RULES[int(tag_for_keyword("PatientName") or 0)] = Act.PATIENT_NAME
RULES[int(tag_for_keyword("ContainerIdentifier") or 0)] = Act.PSEUDO_CONTAINER
RULES[int(tag_for_keyword("SpecimenIdentifier") or 0)] = Act.PSEUDO_SPECIMEN
RULES[int(tag_for_keyword("DeviceSerialNumber") or 0)] = Act.PSEUDO_DEVICE
RULES[int(tag_for_keyword("SpecimenPreparationSequence") or 0)] = Act.SPECIMEN_PREPARATION

# The attributes the verifier accepts in an output dataset (besides REPLACED ones).
OUTPUT_ALLOWED: frozenset[int] = frozenset(t for t, a in RULES.items() if a not in (Act.REMOVE,))
# Content-item attributes that 'filter' mode may keep inside content sequences.
CONTENT_ITEM_TEXT = int(tag_for_keyword("TextValue") or 0)
CONTENT_ITEM_UID = int(tag_for_keyword("UID") or 0)

# Coded concepts of TEXT content items that carry specimen identifiers (DCM).
SPECIMEN_ID_CONCEPTS = frozenset({("121041", "DCM"), ("111705", "DCM")})
IDENTIFYING_CONCEPTS = SPECIMEN_ID_CONCEPTS | {("111724", "DCM"), ("111706", "DCM")}

DUMMY_BY_VR: dict[str, str] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
}
DATE_VRS = frozenset({"DA", "DT", "TM"})
TEXT_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)
MAX_LENGTH_BY_VR: dict[str, int] = {"LO": 64, "SH": 16, "PN": 64, "UI": 64, "CS": 16}

WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
IMPLEMENTATION_VERSION_NAME = "TESSERA_DEID_1"
